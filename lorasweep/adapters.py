"""After training: merge adapters for deployment, verify the merge, switch adapters on one base, sample.

Write-up W5's advice as workflow stages. Everything here uses PEFT's own API: ``PeftModel.from_pretrained``,
``merge_and_unload``, ``load_adapter`` / ``set_adapter`` / ``unload``.

- **merge**: base + adapter -> ``merge_and_unload`` -> a plain model saved with its tokenizer (safetensors).
  A QLoRA adapter is merged onto the *dequantized* 4-bit base (``model.dequantize()``): the merged model
  computes what the 4-bit base + adapter computed, in full precision. Merging onto the original
  full-precision weights instead would add the quantization error back; re-quantizing after the merge
  (PEFT's default for a 4-bit base) would add a second rounding.
- **verify**: the merged model against base + adapter on held-out prompts: the largest absolute logit
  difference, whether greedy generations are identical, and the eval loss of both; and base + adapter against
  the model that trained (its eval loss on the same examples at the end of training): the adapter merged is the
  one the run trained.
- **switch**: one base model, every LoRA adapter attached by name, scored in turn, then unloaded; the
  base must give back its original logits bit for bit.
- **samples**: greedy completions of a few held-out instructions by the base and by every run.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path

from .data import read_jsonl
from .provenance import SAVED_MODEL_PATTERNS, files_fingerprint, honour_umask

log = logging.getLogger(__name__)

# fp32 merge of W + (alpha/r) B A: rounding only; beyond this the merge is wrong, and the job fails.
LORA_MAX_LOGIT_DIFF = 1e-3
# QLoRA, merged onto the dequantized base: verify computes both sides on the CPU in fp32 (the 4-bit layers
# dequantize to the same fp32 weights the merge started from), so the same arithmetic and the same bound, enforced.
QLORA_MAX_LOGIT_DIFF = 1e-3
# base + adapter's eval loss against the one training measured on the same examples, relative: training in fp32
# computed what verify computes (1e-7 apart on the tiny preset, CPU): beyond the bound, verify fails. 16-bit training
# rounds its evaluation (bf16 on the CPU, tiny preset, LoRA's frozen base held in bf16 there too: at most 9e-5, QLoRA's
# included; on a GPU not measured yet): beyond this coarser bound the difference is recorded, warned of and flagged in
# the report, not failed (non-finite logits where training's were finite always fail). Coarse: there, another rank's
# adapter of the same sweep passes it (lora-r128's and lora-r256's in lora-r8's place: 6.2e-3 and 9.0e-3); the
# fingerprint of the files training saved (saved_model_files_sha256) catches that in any precision
IN_TRAINING_REL_TOL = {"fp32": 1e-4}
IN_TRAINING_REL_TOL_16BIT = 2e-2


# These stages run on the CPU, beside training jobs that hold the GPU: PEFT would read adapter weights onto
# GPU 0 whenever CUDA is visible (its infer_device), opening a CUDA context there
ON_CPU = "cpu"


class MergeMismatch(RuntimeError):
    pass


class AdapterMismatch(RuntimeError):
    """The saved adapter does not compute what the run computed when it finished training."""


def with_adapter(base, adapter_dir, name: str = "default", onto=None):
    """``base`` + the adapter saved in ``adapter_dir`` (PEFT's ``PeftModel.from_pretrained``, on the CPU); with
    ``onto`` (a PeftModel holding others already) loaded beside them by ``name`` (``load_adapter``). An adapter
    that does not load (a damaged or incomplete file) fails naming its folder, not with the reader's bare error."""
    from peft import PeftModel

    try:
        if onto is None:
            return PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name, torch_device=ON_CPU)
        onto.load_adapter(str(adapter_dir), adapter_name=name, torch_device=ON_CPU)
        return onto
    except Exception as e:
        raise AdapterMismatch(f"the adapter saved in {adapter_dir} does not load: {type(e).__name__}: {e} (a damaged "
                              "or incomplete file? retrain its run: snakemake --forcerun "
                              f"{Path(adapter_dir).parent / 'metrics.json'})") from e


def load_base(spec: dict, quantized: bool = False):
    """The run's base model on the CPU in fp32, loaded as training loads it (:func:`lorasweep.train.load_model`:
    safetensors only, the same errors); with ``quantized`` the 4-bit base it trained on (computing in fp32)."""
    from .train import load_model

    return load_model({**spec, "quantization": spec["quantization"] if quantized else None}, "cpu", "fp32").eval()


def held_out(eval_jsonl, n: int, tokenizer, max_length: int | None = None) -> list[dict]:
    """The first ``n`` of the eval split's examples that training evaluates: TRL drops an example left with no
    response token once cut to ``max_length`` (its prompt alone fills it), so the examples verify and switch score
    are the ones the run's evaluations scored, in the same order."""
    rows = read_jsonl(eval_jsonl)
    kept = []
    for r in rows:
        if len(kept) == n:
            break
        if any(label != -100 for label in _tokenize(tokenizer, r, max_length)[1]):
            kept.append(r)
    return kept


def _tokenize(tokenizer, row, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """One example's input ids and labels as TRL's SFTTrainer made them (see :func:`_batch`)."""
    from trl.data_utils import common_prefix_length

    eos = tokenizer.eos_token
    completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
    p = tokenizer(text=row["prompt"])["input_ids"]
    pc = tokenizer(text=row["prompt"] + completion)["input_ids"]
    n = common_prefix_length(p, pc)
    x, y = pc, [-100] * n + pc[n:]
    if max_length:
        x, y = x[:max_length], y[:max_length]
    return x, y


def _batch(tokenizer, rows, max_length: int | None = None):
    """Prompt + completion tokenized as TRL's SFTTrainer tokenized them in training (the tokenizer's own special
    tokens, e.g. OPT's leading ``</s>``; EOS after the completion; the completion from where the tokenized
    prompt and prompt + completion diverge; cut to ``max_length``), right-padded, labels -100 on the prompt
    and the padding."""
    import torch

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: load it with lorasweep.train.load_tokenizer(spec), "
                         "which sets it to EOS as training did")
    ids, labels = map(list, zip(*(_tokenize(tokenizer, r, max_length) for r in rows)))
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels])}


def score(model, batch) -> dict:
    """Logits (for comparisons) and the token-weighted loss on the response tokens."""
    import torch

    from .scoring import response_nll

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    sums, counts = response_nll(logits, batch["labels"])
    return {"logits": logits[batch["attention_mask"].bool()], "loss": float(sums.sum() / counts.sum()),
            "loss_sums": sums.tolist(), "tokens": counts.tolist()}


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation, up to ``max_new_tokens`` tokens or the end of the model's positions (a
    prompt that fills them gets none: generating past them fails in the position embedding)."""
    import torch

    from .train import max_positions

    limit = max_positions(model.config)
    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt")  # the prompt as training tokenized it (special tokens included)
        room = max_new_tokens if limit is None else max(0, min(max_new_tokens, limit[1] - enc["input_ids"].shape[1]))
        if room == 0:
            out.append("")
            continue
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=room, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def dequantized_base(spec: dict):
    """The run's base as the 4-bit model it trained on computes it, in fp32 and in the base's own layer types.

    ``model.dequantize()`` turns every 4-bit layer into an ``nn.Linear`` (weight [out, in]); a model whose layers
    were GPT-2's ``Conv1D`` (weight [in, out]) would then save its weights transposed under Conv1D's names, and
    load back as nothing (a shape mismatch) or, square, as the wrong weights. So the full-precision base is loaded
    with its own layers and each quantized layer's weight is replaced by its dequantized value (transposed for a
    Conv1D)."""
    import bitsandbytes as bnb
    import torch

    from .presets import conv1d_class, meta_skeleton

    quantized = load_base(spec, quantized=True)
    conv1d = conv1d_class()
    # a 4-bit model has replaced its linear layers, Conv1D included, by bitsandbytes' own: ask the architecture
    skeleton = (meta_skeleton(quantized.config, spec["model"]["trust_remote_code"], spec["model"].get("revision"))
                if conv1d is not None else None)
    if skeleton is None or not any(isinstance(m, conv1d) for m in skeleton.modules()):
        return quantized.dequantize()  # Linear layers only: dequantized in place, one fp32 copy of the model
    names = {n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    deq = dict(quantized.dequantize().named_modules())
    base = load_base(spec)
    with torch.no_grad():
        for name, m in base.named_modules():
            if name not in names:
                continue
            w = deq[name].weight.to(m.weight.dtype)
            if isinstance(m, conv1d):
                w = w.T
            if w.shape != m.weight.shape:
                raise MergeMismatch(f"cannot merge {spec['run']}: the dequantized 4-bit weight of {name} has shape "
                                    f"{tuple(w.shape)}, the base model's {type(m).__name__} {tuple(m.weight.shape)}")
            m.weight.copy_(w)
    return base


def tensor_digests(model) -> dict:
    """``{name: (shape, sha1 of the bytes)}`` of every tensor in the model's state dict: what a saved copy must hold
    bit for bit (a diverged run's NaNs included), without keeping a second copy of the model in memory."""
    import hashlib

    import torch

    out = {}
    for k, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        out[k] = (tuple(t.shape), hashlib.sha1(t.view(-1).view(torch.uint8).numpy()).hexdigest() if t.numel() else "")
    return out


def check_saved(model, out_dir, trust_remote_code: bool = False) -> None:
    """Load the model saved in ``out_dir`` back with plain transformers and compare every weight with ``model``'s
    (``model``: the merged model, or its :func:`tensor_digests` when the caller has let it go, so that the check
    holds one model in memory, not two): a merge that saved something else (a layer in another layout, a weight
    left out) fails here, naming it."""
    import torch
    from transformers import AutoModelForCausalLM

    mine = model if isinstance(model, dict) else tensor_digests(model)
    try:
        back = AutoModelForCausalLM.from_pretrained(out_dir, use_safetensors=True, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code)
    except Exception as e:
        raise MergeMismatch(f"the merged model saved in {out_dir} does not load back with "
                            f"AutoModelForCausalLM.from_pretrained: {type(e).__name__}: {e}") from e
    theirs = tensor_digests(back)  # the same bytes, NaNs included, or not the merge
    del back
    differ = sorted(k for k in mine if theirs.get(k) != mine[k])
    if differ:
        raise MergeMismatch(f"the merged model saved in {out_dir} loads back with other weights than the merge "
                            f"computed: {', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}")


def merge_run(spec: dict, adapter_dir, out_dir) -> Path:
    """Merge a LoRA / QLoRA adapter into its base and save model + tokenizer (safetensors), then check that the
    saved model loads back as the merge (:func:`check_saved`)."""

    from .train import load_tokenizer

    quantized = bool(spec["quantization"])
    if quantized:
        base = dequantized_base(spec)
        log.info("QLoRA: merging onto the dequantized %s base (lossless w.r.t. what the adapter trained on)",
                 spec["quantization"]["quant_type"])
    else:
        base = load_base(spec)
    merged = with_adapter(base, adapter_dir).merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(spec).save_pretrained(out_dir)  # the one it trained with (a pad token, for batched use)
    honour_umask(out_dir)
    digests = tensor_digests(merged)
    del merged, base  # the load-back check holds one model, not two (a 7B model in fp32: 28 GB each)
    gc.collect()
    check_saved(digests, out_dir, spec["model"]["trust_remote_code"])
    log.info("merged %s into %s", adapter_dir, out_dir)
    return out_dir


def in_training(trained_losses, scored: dict) -> float | None:
    """The eval loss training measured (``eval_losses.json``'s final per-example sums) on the examples ``scored``
    holds, when they are the first examples training evaluated, in the same order (:func:`held_out` with the
    tokenizer selects those; the response token counts must agree, else None)."""
    if not trained_losses or not Path(trained_losses).is_file():
        return None
    final = json.loads(Path(trained_losses).read_text()).get("final") or []
    n = len(scored["tokens"])
    if len(final) < n or [int(r["tokens"]) for r in final[:n]] != [int(t) for t in scored["tokens"]]:
        return None
    return sum(r["loss_sum"] for r in final[:n]) / sum(r["tokens"] for r in final[:n])


def verify_run(spec: dict, adapter_dir, merged_dir, eval_jsonl, out_json, n_prompts: int = 8,
               max_new_tokens: int = 24, trained_losses=None, trained_metrics=None) -> dict:
    """Compare the merged model with base + adapter; fail on a merge beyond tolerance. A run that diverged
    (base + adapter gives non-finite logits) has no merge worth checking: recorded as such, not failed, so the
    report still shows it.

    ``trained_losses`` (the run's ``eval_losses.json``): the same examples' eval loss as training measured it,
    recorded beside base + adapter's. The merge check compares the saved adapter with its merge; this compares
    the saved adapter with the model that trained (an adapter saved or converted wrongly, changed after training
    (another run's, an edited ``adapter_config.json``, a damaged file), a base that is not the one it trained on,
    would differ) and fails beyond a relative tolerance set by the precision training evaluated in
    (``trained_metrics``: the run's ``metrics.json``; 16-bit, or unknown, only a gross difference). Non-finite
    logits where training's last evaluation was finite are such a difference, not a diverged run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = bool(spec["quantization"])
    tok = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=spec["model"]["trust_remote_code"])
    max_length = spec["training"].get("max_length")
    rows = held_out(eval_jsonl, n_prompts, tok, max_length)  # the examples training evaluated
    batch = _batch(tok, rows, max_length)
    adapted = with_adapter(load_base(spec, quantized), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(  # plain transformers
        merged_dir, use_safetensors=True, trust_remote_code=spec["model"]["trust_remote_code"]).eval()
    a, m = score(adapted, batch), score(merged, batch)
    diff = float((a["logits"] - m["logits"]).abs().max())
    gen_a = greedy(adapted, tok, [r["prompt"] for r in rows], max_new_tokens)
    gen_m = greedy(merged, tok, [r["prompt"] for r in rows], max_new_tokens)
    bound = QLORA_MAX_LOGIT_DIFF if quantized else LORA_MAX_LOGIT_DIFF
    trained = in_training(trained_losses, a)
    trained_finite = trained is not None and math.isfinite(trained)
    trained_info = (json.loads(Path(trained_metrics).read_text())
                    if trained_metrics and Path(trained_metrics).is_file() else {})
    precision = trained_info.get("precision")
    # the adapter's files against those training saved, by content (exact in any precision; none recorded by a run
    # trained before lorasweep recorded it)
    saved = trained_info.get("saved_model_files_sha256")
    now = files_fingerprint(adapter_dir, cache_path=None, patterns=SAVED_MODEL_PATTERNS) if saved else None
    rel_tol = IN_TRAINING_REL_TOL.get(precision, IN_TRAINING_REL_TOL_16BIT)
    # non-finite logits are a diverged run's only when training's last evaluation was not finite either (or unknown)
    diverged = not bool(torch.isfinite(a["logits"]).all()) and not trained_finite
    as_trained = (None if not trained_finite
                  else math.isfinite(a["loss"]) and abs(a["loss"] - trained) <= rel_tol * abs(trained))
    result = {"run": spec["run"], "quantized": quantized, "prompts": len(rows), "diverged": diverged,
              "max_abs_logit_diff": diff, "tolerance": bound, "within_tolerance": None if diverged else diff <= bound,
              "greedy_identical": gen_a == gen_m, "greedy_identical_count": sum(x == y for x, y in zip(gen_a, gen_m)),
              "eval_loss_adapter": a["loss"], "eval_loss_merged": m["loss"],
              "eval_loss_in_training": trained, "training_precision": precision,
              "in_training_rel_tolerance": rel_tol, "adapter_as_trained": as_trained,
              "adapter_files_as_saved": None if saved is None else now == saved,
              "merged_onto": "dequantized 4-bit base" if quantized else "base weights"}
    Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s: max |logit diff| %.2e (tolerance %.0e), greedy identical %d/%d, loss %.5f vs %.5f", spec["run"],
             diff, bound, result["greedy_identical_count"], len(rows), a["loss"], m["loss"])
    metrics = trained_metrics or Path(adapter_dir).parent / "metrics.json"  # the run's: retraining it is the fix
    if as_trained is False:
        message = (
            f"{spec['run']}: base + adapter gives eval loss {a['loss']:.5f} on {len(rows)} held-out examples, the run "
            f"measured {trained:.5f} on the same examples at the end of training ({precision or 'precision unknown'};"
            f" tolerance {rel_tol:g} relative): the adapter in {adapter_dir} does not compute what the model that "
            "trained computed (changed since training: another run's adapter, an edited adapter_config.json, a "
            f"damaged file; or saved wrongly). Do not deploy it; retrain it: snakemake --forcerun {metrics}")
        if precision in IN_TRAINING_REL_TOL or not math.isfinite(a["loss"]):
            raise AdapterMismatch(message)
        log.warning("%s (not failed: after 16-bit training, or in a precision not recorded, this bound is not measured; "
                    "the report flags it)", message)
    if result["adapter_files_as_saved"] is False:  # what the loss cannot tell after 16-bit training: another rank's
        raise AdapterMismatch(
            f"{spec['run']}: the adapter in {adapter_dir} is not the one training saved: its files' fingerprint is "
            f"{now[:12]}, training recorded {saved[:12]} (saved_model_files_sha256 in {metrics}); changed since "
            "training (another run's adapter, an edited adapter_config.json, a damaged file). Do not deploy it; "
            f"retrain it: snakemake --forcerun {metrics}")
    if diverged:
        log.warning("%s: base + adapter gives non-finite logits (the run diverged): its merge is not checked",
                    spec["run"])
    elif not result["within_tolerance"]:
        # (Snakemake deletes a failed job's outputs, out_json included: the figures go in the message)
        raise MergeMismatch(f"merged {spec['run']} differs from base + adapter by {diff:.3g} in the logits "
                            f"(tolerance {bound:g}) on {len(rows)} held-out examples; greedy generations "
                            f"identical {result['greedy_identical_count']}/{len(rows)}; eval loss {a['loss']:.5f} "
                            f"with the adapter, {m['loss']:.5f} merged: do not deploy this merge")
    return result


def switch_adapters(spec: dict, adapters: dict[str, str], eval_jsonl, out_json, n_prompts: int = 8) -> dict:
    """Load the base once, attach every adapter by name, score each, unload, check the base is untouched."""
    import torch

    from .train import load_tokenizer

    tok, max_length = load_tokenizer(spec), spec["training"].get("max_length")
    batch = _batch(tok, held_out(eval_jsonl, n_prompts, tok, max_length), max_length)
    base = load_base(spec)
    before = score(base, batch)
    names = list(adapters)
    model = with_adapter(base, adapters[names[0]], names[0])
    for name in names[1:]:
        with_adapter(base, adapters[name], name, onto=model)
    results = []
    for name in names:
        model.set_adapter(name)
        s = score(model.eval(), batch)
        results.append({"adapter": name, "eval_loss": s["loss"],
                        "max_abs_logit_diff_vs_base": float((s["logits"] - before["logits"]).abs().max())})
        log.info("adapter %s: eval loss %.5f on %d held-out examples", name, s["loss"], len(batch["input_ids"]))
    restored = model.unload()
    after = score(restored, batch)
    exact = bool(torch.equal(after["logits"], before["logits"]))
    out = {"base_eval_loss": before["loss"], "adapters": results, "unload_restores_base_exactly": exact,
           "examples": int(batch["input_ids"].shape[0])}
    Path(out_json).write_text(json.dumps(out, indent=2) + "\n")
    if not exact:
        worst = float((after["logits"] - before["logits"]).abs().max())
        raise RuntimeError(f"after unload() the base model's logits differ from the original by up to {worst:.3g}: "
                           "attaching and removing adapters changed the base weights")
    log.info("%d adapters switched on one base; after unload() its logits are the original's bit for bit; wrote %s",
             len(names), out_json)
    return out


def _instruction_and_input(prompt: str) -> dict:
    """The instruction and input back out of an Alpaca-formatted prompt."""
    import re

    ins = re.search(r"### Instruction:\n(.*?)\n\n###", prompt, re.S)
    inp = re.search(r"### Input:\n(.*?)\n\n###", prompt, re.S)
    return {"instruction": ins.group(1) if ins else prompt, "input": inp.group(1) if inp else ""}


def sample_runs(specs: dict[str, dict], models: dict[str, str], eval_jsonl, out_json, n: int = 3,
                max_new_tokens: int = 48) -> list[dict]:
    """Greedy completions of the first ``n`` held-out instructions: the base model, then every run."""
    from transformers import AutoModelForCausalLM

    from .train import load_tokenizer

    spec = next(iter(specs.values()))
    tok = load_tokenizer(spec)
    rows = held_out(eval_jsonl, n, tok, spec["training"].get("max_length"))  # those training evaluated
    prompts = [r["prompt"] for r in rows]
    out = [{**_instruction_and_input(r["prompt"]), "reference": r["completion"], "completions": {}} for r in rows]
    for i, text in enumerate(greedy(load_base(spec), tok, prompts, max_new_tokens)):
        out[i]["completions"]["base (untrained)"] = text
    for run, path in models.items():
        if (Path(path) / "adapter_config.json").exists():
            model = with_adapter(load_base(specs[run], bool(specs[run]["quantization"])), path).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, use_safetensors=True, trust_remote_code=specs[run]["model"]["trust_remote_code"]).eval()
        for i, text in enumerate(greedy(model, tok, prompts, max_new_tokens)):
            out[i]["completions"][run] = text
        log.info("sampled %s", run)
    Path(out_json).write_text(json.dumps(out, indent=2) + "\n")
    log.info("wrote the greedy completions of %d held-out instructions, base and %d runs, to %s", len(out),
             len(models), out_json)
    return out

