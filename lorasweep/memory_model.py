"""Predicted training memory from first principles, shown beside the measured figure.

Assumptions (stated in the report):
- weights at their storage dtype: fp32 = 4 bytes; 16-bit = 2 (a LoRA run's frozen linear weights when training
  computes in 16 bits: ``training.frozen_weights_16bit``); a 4-bit layer 0.5 byte per weight plus one fp32
  absmax per 64-weight block (0.0625 byte; double quantization makes it smaller);
- gradients and AdamW's two moments for trainable parameters only, in fp32: 4 + 8 bytes each;
- activations: the bytes autograd keeps for the backward pass (every saved tensor that is not a parameter and is
  still held when the forward pass ends, each storage once), counted on the training model itself in its training
  mode, precision and device with three short probe batches, and scaled to the longest padded batch fed (b
  sequences of s tokens) as f + b * (a*s + c*s^2): what the architecture, the method (a frozen weight's layer
  keeps no input for a weight gradient), dropout, autocast's 16-bit copies and the attention kernel (eager
  attention's s^2 matrices; SDPA's fused kernels keep none) really keep, where a formula such as Korthikanti et
  al.'s 34*s*b*h per layer fits one architecture (GeLU MLP, 16-bit, bool dropout masks) and missed OPT's by up to
  40%. Gradient checkpointing is counted too (only the layers' inputs are kept);
- the working memory of TRL's chunked loss over the LM head (SFTTrainer never builds the b x s x vocab
  logits): one tile of up to 4,096 positions x 32,768 vocabulary columns at the compute dtype, folded in
  place by TRL's Triton kernels on CUDA; on the CPU its torch fallback holds 7.25 more fp32 tiles of
  temporaries in the backward pass; plus the fp32 gradient of the hidden states;
- the peak is weights + AdamW state + the larger of activations and gradients: autograd creates each
  layer's weight gradients as it frees that layer's saved tensors, and the Trainer frees the gradients
  between steps, so the two peak at the two ends of a backward pass, not together (with gradient
  accumulation the first micro-batches' gradients wait beside the next one's activations: both count);
- no allocator caching, fragmentation or framework workspace: the error shows how much that is.
"""

from __future__ import annotations

import math
import weakref

BLOCK = 64


def weight_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            n = math.prod(qs.shape)  # the weights a packed 4-bit tensor stands for
            total += n // 2 + 4 * ((n + BLOCK - 1) // BLOCK)
        else:
            total += p.numel() * p.element_size()
    return total


PROBE_LENGTHS = (32, 64, 128)  # tokens per probe sequence: three lengths separate the fixed, s and s^2 terms
PROBE_BATCH = 2


def saved_bytes(model, batch: int, length: int, half, fused_loss: bool) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one training forward of ``batch`` random
    sequences of ``length`` tokens (parameters left out, a storage shared by several saved tensors counted
    once, and only what is still held when the forward pass ends: a graph built and dropped inside it, like
    DoRA's weight norm, frees what it saved). ``half``: the autocast dtype training uses, or None."""
    import torch

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    saved: list = []  # weak references: a graph the forward built and dropped (DoRA's weight norm) frees its own

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    was_training = model.training
    model.train()
    kwargs = {"fused_lm_head": True} if fused_loss else {}
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=half, enabled=half is not None):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, **kwargs)
        kept: dict[int, int] = {}  # what the backward pass still needs, each storage once
        for ref in saved:
            t = ref()
            if t is not None and (ptr := t.untyped_storage().data_ptr()) not in param_storages:
                kept[ptr] = t.untyped_storage().nbytes()
        del out
    finally:
        model.train(was_training)
    return sum(kept.values())


def probe_lengths(model) -> tuple[int, ...]:
    """:data:`PROBE_LENGTHS`, or for a model with fewer positions than the longest (``model.build_tiny.max_positions``
    may be 16) three lengths that fit in them, in the same ratios: a probe past the model's positions fails in its
    position embedding, and the run would go without a prediction."""
    from .train import max_positions

    limit = max_positions(model.config)
    if limit is None or limit[1] >= PROBE_LENGTHS[-1]:
        return PROBE_LENGTHS
    longest = limit[1]
    return (longest // 4, longest // 2, longest)


def activation_bytes(model, batch_size: int, seq_len: int, half, fused_loss: bool) -> int:
    """What autograd keeps for a batch of ``batch_size`` x ``seq_len``: f + b * (a*s + c*s^2), with f (kept once
    per step whatever the batch: autocast's 16-bit copies of the weights stored in fp32), a and c solved from three
    probe batches (c is 0 up to rounding unless attention keeps its s x s matrices)."""
    import numpy as np

    lengths = np.array(probe_lengths(model), dtype=float)
    kept = np.array([saved_bytes(model, PROBE_BATCH, int(n), half, fused_loss) for n in lengths], dtype=float)
    f, a, c = np.linalg.solve(np.stack([np.ones_like(lengths), PROBE_BATCH * lengths, PROBE_BATCH * lengths**2], 1),
                              kept)
    return int(max(0.0, f) + batch_size * (a * seq_len + max(0.0, c) * seq_len**2))


def chunked_loss_work_bytes(model, batch_size: int, seq_len: int, precision: str) -> int:
    """Working memory of TRL's chunked log-prob loss over the LM head in the backward pass (its largest):
    a tile of positions x vocabulary columns at the compute dtype, plus (CPU fallback) 7.25 fp32 tiles of
    temporaries, plus the fp32 gradient of the hidden states. Positions: all ``batch_size * (seq_len - 1)``
    (on CUDA only labelled ones are scored: an upper bound there)."""
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, _use_triton
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as VOCAB_CHUNK
    except ImportError:  # the constants of TRL 1.16
        TOKEN_CHUNK_SIZE, VOCAB_CHUNK = 4096, 32768

        def _use_triton(device):
            return device.type == "cuda"
    vocab, width = model.get_output_embeddings().weight.shape
    device = next(model.parameters()).device
    n = batch_size * max(0, seq_len - 1)
    tile = min(n, TOKEN_CHUNK_SIZE) * min(vocab, VOCAB_CHUNK)
    compute = 2 if precision in ("bf16", "fp16") else 4
    temporaries = 0 if _use_triton(device) else 7.25 * 4
    return int(tile * (compute + temporaries) + n * width * 4)


def predict(model, trainable_params: int, batch_size: int, seq_len: int, precision: str,
            fused_loss: bool = False, grad_accum: int = 1) -> dict:
    """Predicted bytes by component; ``predicted_train_increment_bytes`` excludes the weights loaded before.
    ``fused_loss``: the model's forward takes TRL's ``fused_lm_head`` (SFTTrainer's loss, as lorasweep trains);
    without it the model's own loss, whose saved logits the probe counts. With ``grad_accum`` > 1 the
    gradients of the first micro-batches are kept while the next ones' activations are: then both count."""
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    saved = activation_bytes(model, batch_size, seq_len, half, fused_loss)
    loss_work = chunked_loss_work_bytes(model, batch_size, seq_len, precision) if fused_loss else 0
    activations = saved + loss_work
    weights = weight_bytes(model)
    grads = 4 * trainable_params
    optimizer = 8 * trainable_params
    beyond = grads if grad_accum > 1 else max(0, grads - activations)
    return {
        "predicted_weights_bytes": weights,
        "predicted_gradients_bytes": grads,
        "predicted_optimizer_bytes": optimizer,
        "predicted_activations_bytes": activations,
        "predicted_saved_for_backward_bytes": saved,
        "predicted_loss_work_bytes": loss_work,
        # the larger of the two phases of a backward pass: its start (every activation kept, no gradient yet:
        # the Trainer frees them between steps) and its end (every gradient, the activations freed as each
        # layer's backward ran); with gradient accumulation, both at once
        "predicted_gradients_beyond_activations_bytes": beyond,
        "predicted_peak_bytes": weights + optimizer + activations + beyond,
        "predicted_train_increment_bytes": optimizer + activations + beyond,
        "predicted_for_seq_len": seq_len,
    }


def compare(pred: dict, measured: dict) -> dict:
    """Error of the prediction against what was measured.

    CUDA: predicted peak vs ``peak_cuda_allocated_bytes``. CPU: predicted increment over the load footprint
    vs ``peak_rss_bytes - rss_at_load_bytes`` (the process's own baseline is not modelled).
    """
    if not pred:
        return {"memory_model_compared_to": None, "memory_model_error_pct": None}
    if measured.get("peak_cuda_allocated_bytes"):
        target, value = "peak_cuda_allocated_bytes", pred["predicted_peak_bytes"]
        actual = measured["peak_cuda_allocated_bytes"]
    elif measured.get("peak_rss_bytes") and measured.get("rss_at_load_bytes"):
        target, value = "peak_rss_bytes - rss_at_load_bytes", pred["predicted_train_increment_bytes"]
        actual = measured["peak_rss_bytes"] - measured["rss_at_load_bytes"]
    else:
        return {"memory_model_compared_to": None, "memory_model_error_pct": None}
    return {"memory_model_compared_to": target, "measured_compared_bytes": actual,
            "memory_model_error_pct": 100.0 * (value - actual) / actual if actual else None}
