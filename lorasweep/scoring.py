"""How every run is scored: the loss summed over each eval example's response tokens, and their count.

One measure for the metrics, the loss curves, the paired comparisons between runs and the adapter checks
(merge, verify, switch): every response token counts once, whatever the batch it was scored in.
"""

from __future__ import annotations

import math


def response_nll(logits, labels):
    """Next-token loss summed over each sequence's labelled (response) tokens, and their count.

    One sequence at a time: an fp32 copy of a whole batch's logits (and cross-entropy's log-softmax of
    it) would be 2 x 16 x 512 x 50,272 x 4 bytes = 3.3 GB for opt-350m at the default eval batch, more
    than training itself needs."""
    import torch
    import torch.nn.functional as F

    labels = labels[:, 1:]
    mask = labels != -100
    nll = torch.stack([F.cross_entropy(logits[i, :-1].float(), labels[i], ignore_index=-100, reduction="sum")
                       for i in range(logits.shape[0])])
    return nll, mask.sum(1)


def token_weighted(examples: list[dict]) -> float:
    """Mean loss per response token over the eval split: every token counts once, whatever its batch."""
    return sum(e["loss_sum"] for e in examples) / max(1, sum(e["tokens"] for e in examples))


def perplexity(loss: float) -> float:
    """exp(loss); infinite where that overflows a float (a diverged run's loss), NaN for NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def per_example_losses(trainer) -> list[dict]:
    """Loss summed over each eval example's response tokens, and their count, in eval-split order.

    The report uses these for paired comparisons between runs (every run is scored on the same
    examples), so a difference in eval loss comes with a confidence interval instead of a guess.
    """
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    # the order the eval dataloader visits the examples in (lorasweep's: longest first; a plain Trainer's:
    # split order), so that every result lands at its example's place in the split
    sampler = trainer._get_eval_sampler(trainer.eval_dataset)
    if sampler is not None and not isinstance(sampler, (list, torch.utils.data.SequentialSampler)):
        raise TypeError(f"per-example losses need a fixed eval order, not a {type(sampler).__name__}")
    order = list(sampler if sampler is not None else range(len(trainer.eval_dataset)))
    out: list[dict | None] = [None] * len(order)
    seen = 0
    # The precision training computes in, for every evaluation: accelerate wraps the model's forward in
    # autocast only once training starts, so without this the untrained model was scored in fp32 and every
    # later evaluation in bf16 (~1e-3 apart per example on the tiny model).
    half = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    device_type = next(model.parameters()).device.type
    # The random state is put back afterwards: a dataloader draws its seed from the global generator, so
    # without this every evaluation would move the dropout masks of the training that follows, and how
    # often a run evaluates (training.evals) would change what it learns.
    devices = [torch.cuda.current_device()] if device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            torch.autocast(device_type, dtype=half, enabled=half is not None):
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            sums, counts = response_nll(logits, labels)
            for s, n in zip(sums.tolist(), counts.tolist()):
                out[order[seen]] = {"loss_sum": s, "tokens": int(n)}
                seen += 1
    model.train(was_training)
    if seen != len(order):
        raise RuntimeError(f"evaluation scored {seen} of {len(order)} eval examples")
    return out
