"""Model FLOPs utilisation: how much of the GPU's peak the training step turns into model arithmetic.

Per non-padding token, a forward and backward pass of a dense decoder costs about 2 FLOPs per parameter
forward, 2 backward for the activations' gradient, and 2 more for the weight gradient where the weight
trains: 4 x N + 2 x T, with N the model's parameters (an adapter's included) and T the trainable ones. That
is 6 x N for full fine-tuning and about 4 x N with a frozen base (LoRA, QLoRA), the adapter's own weights
counted at 6. Attention's s^2 term is left out. MFU = FLOPs per token x tokens/s / peak.

Counted as the step computes them (:func:`flop_params`, given for a run): embedding tables (positions, and
token embeddings not tied to the LM head) are looked up, not multiplied, so they add nothing; the LM head
needs only the positions with a label (the response's under ``completion_only_loss``, about half of CodeAlpaca's
tokens), the only ones TRL's fused LM head (lorasweep's loss) projects on CUDA with Triton (torch's CUDA wheels
ship it; elsewhere it scores every position, extra work that model FLOPs do not count). Without these,
4 x N + 2 x T over every token would overstate opt-350m's MFU by ~5% on CodeAlpaca (its 25.7 M-weight head is 8%
of its weights, 48% of the tokens carry a label; its position table 0.6%) and more for models with larger vocabularies.

:func:`step_ceiling` adds what a step must also move through GPU memory whatever its batch (reading every
weight, AdamW's update of every trainable one): with few tokens a step, that traffic, not the arithmetic,
bounds MFU, however fast the host and the kernels.
"""

from __future__ import annotations

import re

# By a pattern of torch.cuda.get_device_name(), first match wins: dense 16-bit tensor-core peak FLOP/s (bf16;
# fp16 on the GPUs without bf16, V100 and T4, where lorasweep trains in fp16; no sparsity) and memory bandwidth
# in bytes/s, from NVIDIA's data sheets. SXM parts are named without a form factor ("NVIDIA H100 80GB HBM3");
# PCIe and NVL parts have lower peaks (and H100 PCIe less bandwidth).
GPUS = (
    (r"H200 NVL", 835e12, 4.8e12),
    (r"H200", 989e12, 4.8e12),
    (r"H100 NVL", 835e12, 3.9e12),
    (r"H100.*PCIe", 756e12, 2.0e12),
    (r"H100", 989e12, 3.35e12),
    (r"A100.*80GB.*PCIe", 312e12, 1.935e12),
    (r"A100.*80GB", 312e12, 2.039e12),
    (r"A100", 312e12, 1.555e12),
    (r"L40S", 362e12, 0.864e12),
    (r"\bL4\b", 121e12, 0.3e12),
    (r"\bA10\b", 125e12, 0.6e12),
    (r"V100S", 130e12, 1.134e12),
    (r"V100.*PCIE", 112e12, 0.9e12),
    (r"V100", 125e12, 0.9e12),
    (r"\bT4\b", 65e12, 0.32e12),
)


def _gpu(gpu_name: str | None) -> tuple[float, float] | None:
    if not gpu_name:
        return None
    return next(((peak, bw) for pat, peak, bw in GPUS if re.search(pat, gpu_name, re.IGNORECASE)), None)


def peak_flops(gpu_name: str | None) -> float | None:
    g = _gpu(gpu_name)
    return g[0] if g else None


def memory_bandwidth(gpu_name: str | None) -> float | None:
    g = _gpu(gpu_name)
    return g[1] if g else None


FLOP_KEYS = ("embedding_table_params", "embedding_table_trainable_params", "lm_head_params",
             "lm_head_trainable_params")


def flop_params(model) -> dict:
    """What :func:`flops_per_token` needs beyond the parameter counts: the weights of embedding tables (looked
    up, never multiplied: positions, and token embeddings unless they are the LM head's weight) and of the LM
    head, and how many of each train."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    tables, seen = [], {id(head_w)}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Embedding) and w is not None and id(w) not in seen:
            seen.add(id(w))
            tables.append(w)
    return {"embedding_table_params": sum(w.numel() for w in tables),
            "embedding_table_trainable_params": sum(w.numel() for w in tables if w.requires_grad),
            "lm_head_params": head_w.numel() if head_w is not None else 0,
            "lm_head_trainable_params": head_w.numel() if head_w is not None and head_w.requires_grad else 0}


def flops_per_token(total_params: int, trainable_params: int, *, embedding_table_params: int = 0,
                    embedding_table_trainable_params: int = 0, lm_head_params: int = 0,
                    lm_head_trainable_params: int = 0, labelled_share: float = 1.0) -> float:
    """FLOPs per non-padding token (module docstring): 4 x N + 2 x T over the weights that multiply every token
    (all but the embedding tables and the LM head), plus the LM head's 4 x H + 2 x H_trainable on the share of
    tokens it projects (``labelled_share``). Without the keywords: 4 x N + 2 x T, 6 x N for full fine-tuning."""
    body = total_params - embedding_table_params - lm_head_params
    body_trainable = trainable_params - embedding_table_trainable_params - lm_head_trainable_params
    return 4 * body + 2 * body_trainable + labelled_share * (4 * lm_head_params + 2 * lm_head_trainable_params)


def mfu(total_params: int, trainable_params: int, tokens_per_s: float, gpu_name: str | None,
        half: bool = True, **shape) -> float | None:
    """Model FLOPs utilisation against the GPU's 16-bit peak: None for a GPU not in :data:`GPUS` and for training
    that does not compute in 16 bits (``half``: bf16 or fp16), whose peak is another (fp32: several times lower).
    ``shape``: :func:`flops_per_token`'s keywords (:func:`flop_params` and the labelled share)."""
    peak = peak_flops(gpu_name)
    return flops_per_token(total_params, trainable_params, **shape) * tokens_per_s / peak if peak and half else None


def bytes_per_step(trainable: int, frozen: int, quantized: int, half: bool, micro_batches: int = 1,
                   frozen_16bit: int = 0) -> float:
    """Bytes an optimizer step reads and writes in GPU memory for its weights alone, whatever its batch.

    Weights are stored in fp32 (as lorasweep loads them; a 16-bit frozen base: below) and, with 16-bit autocast
    (``half``), cast to 16 bits for each matrix product. Per trainable weight and micro-batch: the cast (read 4
    bytes, write 2; autocast keeps the copy for the backward pass), the forward product and the backward product for
    the activations' gradient read the copy (2 + 2), the weight gradient is written (2) and cast back to fp32 (read
    2, write 4), and from the second micro-batch on added to the gradient so far (read 4 + 4, write 4); once a step,
    gradient clipping (the Trainer's ``max_grad_norm``, 1.0) reads the gradient for its norm and scales it (4 + 4 +
    4), and fused AdamW reads weight, gradient and both moments and writes weight and moments (16 + 12): 58 bytes a
    step without gradient accumulation, 52 without autocast. Per frozen fp32 weight and micro-batch: the cast (4 +
    2; autocast does not keep casts of weights without gradients) and the two products (2 + 2): 10 bytes; 8 without
    autocast. Of the ``frozen``, the ``frozen_16bit`` stored in 16 bits (``training.frozen_weights_16bit``: a LoRA
    base) cost only the two products' reads, 4 bytes. Per 4-bit weight (QLoRA) and micro-batch: dequantized once for
    the forward and once for the backward product (read 0.5 + 1/16 for its block's absmax, write the 16- or 32-bit
    weight, which the product reads). Activations are left out (they grow with the batch), and so is every weight
    read a step could avoid (activation checkpointing's second forward), and smaller items (the tied embedding's
    scattered gradient, fp16's loss scaling): a step made of these kernels (autocast's casts, cuBLAS products, fused
    AdamW) moves at least this much. Kernels fused otherwise (a product reading fp32 weights directly) could move
    less.
    """
    w = 2 if half else 4
    g = micro_batches
    per_trainable = g * ((4 + w if half else 0) + 3 * w + (w + 4 if half else 0)) + (g - 1) * 12 + 12 + 16 + 12
    per_frozen = g * ((4 + w if half else 0) + 2 * w)
    per_frozen_16bit = g * 2 * 2
    per_quantized = g * 2 * (0.5 + 1 / 16 + 2 * w)
    return (per_trainable * trainable + per_frozen * (frozen - frozen_16bit) + per_frozen_16bit * frozen_16bit
            + per_quantized * quantized)


def step_ceiling(*, total_params: int, trainable_params: int, quantized_params: int, tokens_per_step: float,
                 half: bool, gpu_name: str | None, micro_batches: int = 1, frozen_16bit_params: int = 0,
                 flop_shape: dict | None = None) -> dict | None:
    """The fastest an optimizer step of ``tokens_per_step`` non-padding tokens could run on this GPU: its
    model FLOPs at the dense peak plus its weights' memory traffic (:func:`bytes_per_step`) at full bandwidth,
    one after the other (different kernels on one stream). Returns that floor on the step time, the tokens/s
    and MFU it allows, and the tokens a step would need for the traffic to cost as much time as the
    arithmetic (an MFU ceiling of 50%); None for a GPU not in :data:`GPUS` and for training that does not
    compute in 16 bits (``half``). A bound, not a prediction:
    real kernels reach 60-80% of peak and bandwidth, and a host that cannot queue kernels as fast as the
    GPU runs them adds its own time.
    """
    g = _gpu(gpu_name)
    if not g or tokens_per_step <= 0 or not half:  # fp32: not the 16-bit peak's arithmetic
        return None
    peak, bandwidth = g
    frozen = total_params - trainable_params - quantized_params
    compute_s = flops_per_token(total_params, trainable_params, **(flop_shape or {})) * tokens_per_step / peak
    memory_s = bytes_per_step(trainable_params, frozen, quantized_params, half, micro_batches,
                              frozen_16bit_params) / bandwidth
    floor_s = compute_s + memory_s
    return {"step_floor_s": floor_s, "step_compute_s": compute_s, "step_memory_s": memory_s,
            "tokens_per_s": tokens_per_step / floor_s, "mfu": compute_s / floor_s,
            "tokens_per_step_at_half": tokens_per_step * memory_s / compute_s}


def flop_shape(params: dict, labelled_share: float = 1.0) -> dict:
    """:func:`flops_per_token`'s keywords from a run's parameter counts (:func:`flop_params` among them) and the
    share of its non-padding tokens that carry a label."""
    return {**{k: params[k] for k in FLOP_KEYS if params.get(k) is not None}, "labelled_share": labelled_share}


def ceiling_metrics(params: dict, tokens_per_step: float, half: bool, gpu_name: str | None,
                    micro_batches: int = 1, labelled_share: float = 1.0) -> dict:
    """A run's :func:`step_ceiling` as metrics (empty off a known GPU)."""
    c = step_ceiling(total_params=params["total_params"], trainable_params=params["trainable_params"],
                     quantized_params=params.get("quantized_params", 0), tokens_per_step=tokens_per_step,
                     half=half, gpu_name=gpu_name, micro_batches=micro_batches,
                     frozen_16bit_params=params.get("frozen_16bit_params", 0),
                     flop_shape=flop_shape(params, labelled_share))
    if c is None:
        return {}
    return {"mfu_ceiling_pct": 100 * c["mfu"], "tokens_per_s_ceiling": c["tokens_per_s"],
            "step_floor_ms": 1e3 * c["step_floor_s"], "step_floor_memory_ms": 1e3 * c["step_memory_s"]}


def single_run_config(model: str, train_jsonl, run: str, *, lr: float, device: str, seed: int,
                      lora: dict | None = None, **training) -> dict:
    """A validated configuration with one run (``full``, ``lora-r<rank>`` or ``qlora-r<rank>``): what the
    benchmarks train. ``lora``: settings of ``methods.lora`` (``dropout``, ``target_modules``, ...), which QLoRA
    runs share."""
    from .config import ConfigError, is_plain, parse_run, validate_config

    method, r = parse_run(run)
    if not is_plain(run):
        raise ConfigError(f"{run!r}: the benchmarks take full, lora-r<rank> or qlora-r<rank>; give adapter options "
                          "(use_rslora, use_dora, init, ...) as lora settings instead of in the run's name")
    rank = [r] if method != "full" else []
    return validate_config({
        "model": {"name_or_path": model}, "dataset": {"source": str(train_jsonl)}, "seed": seed,
        "methods": {"full": {"enabled": method == "full", "learning_rate": lr},
                    "lora": {**(lora or {}), "ranks": rank if method == "lora" else [], "learning_rate": lr},
                    "qlora": {"ranks": rank if method == "qlora" else [], "learning_rate": lr}},
        # no warmup: the plain recipe (SFTConfig defaults) has none, and the benchmarks compare the training
        # step at equal hyperparameters
        "training": {"device": device, "evals": 1, "warmup_ratio": 0.0, **training},
    })


def train_single_run(model: str, train_jsonl, eval_jsonl, out, run: str, *, lr: float, device: str, seed: int,
                     callbacks=(), lora: dict | None = None, **training) -> dict:
    """Train one run as the benchmarks do (:func:`single_run_config`, its operational settings, no checkpoints)
    and return its metrics. ``callbacks``: more ``TrainerCallback`` objects (:func:`step_profiler`)."""
    from .config import operational, run_spec
    from .train import train_run

    import torch

    cfg = single_run_config(model, train_jsonl, run, lr=lr, device=device, seed=seed, lora=lora, **training)
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        return train_run(run_spec(cfg, run), train_jsonl, eval_jsonl, out,
                         operational={**operational(cfg), "checkpoint_steps": 0}, callbacks=callbacks)
    finally:  # train_run sets cuDNN attention for its process; a recipe run after this one gets torch's default
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def step_profiler(out, first: int, steps: int):
    """A ``TrainerCallback`` that records training steps ``first + 1 .. first + steps`` with ``torch.profiler``
    (host operations; on CUDA also the device's kernels and copies) and writes to the folder ``out``:
    ``trace.json.gz`` (Chrome / Perfetto trace), ``ops.txt`` (operators by host time and, on CUDA, by device
    time) and ``profile.json`` (the window's wall clock per step). ``benchmarks/profile_summary.py`` reads the
    trace: how much of a step the GPU computed, and how long the host waited for it.

    Pick a window without evaluations (the benchmarks evaluate after the last step only): the Trainer
    evaluates inside a step's end.
    """
    import gzip
    import json
    import shutil
    import time
    from pathlib import Path

    import torch
    from transformers import TrainerCallback

    out = Path(out)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepProfile(TrainerCallback):
        """Starts when step ``first`` ends (at the start of training for 0) and stops when step ``first + steps``
        ends: every profiled step then counts once each of its parts, which the Trainer runs in this order:
        the batch drawn and copied to the device, the step, its ``on_step_end``, then its logging (so the
        window holds the logging of steps ``first .. first + steps - 1``)."""

        def __init__(self):
            self.prof, self.t0 = None, 0.0

        def _start(self):
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            sync()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            if first == 0 and state.global_step == 0:  # a training start happens once
                self._start()

        def on_step_end(self, args, state, control, **kwargs):
            if first > 0 and state.global_step == first:  # each step ends once
                self._start()
                return
            if self.prof is None or state.global_step < first + steps:
                return
            sync()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            prof, self.prof = self.prof, None
            out.mkdir(parents=True, exist_ok=True)
            (out / "profile.json").write_text(json.dumps({
                "first_step": first + 1, "steps": steps, "wall_s": wall, "wall_ms_per_step": 1e3 * wall / steps,
                "device": "cuda" if torch.cuda.is_available() else "cpu"}, indent=1))
            tables = []
            for key in ("self_cpu_time_total", "self_cuda_time_total"):
                try:
                    tables.append(f"sorted by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=40))
                except Exception as e:  # noqa: BLE001 - a table is a convenience; the trace is the record
                    tables.append(f"sorted by {key}: {e}")
            (out / "ops.txt").write_text("\n\n".join(tables))
            raw = out / "trace.json"
            prof.export_chrome_trace(str(raw))
            with raw.open("rb") as f, gzip.open(out / "trace.json.gz", "wb") as g:
                shutil.copyfileobj(f, g)
            raw.unlink()

    return StepProfile()


# Tensor methods that hand a value to Python: on a GPU each one waits until the device has computed it
HOST_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"})
# operations whose output size depends on the data: on a GPU they read that size back before returning
DATA_SIZED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"})


def _bool_index(args) -> bool:
    """``t[mask]`` with a boolean mask (a data-dependent size, like ``nonzero``)."""
    import torch

    idx = args[1] if len(args) > 1 else None
    parts = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)


_BATCH_ASSEMBLY = ("accelerate/data_loader.py", "transformers/trainer_pt_utils.py")


class HostReads:
    """Counts the places where Python reads a tensor's value (``.item()``, ``int(t)``, ``if t:``, ``.tolist()``,
    ``.cpu()``, ...) or an operation must learn its output's size from the data (``nonzero``, ``t[mask]``,
    ``unique``, ...) while active. On a GPU each such read makes the host wait until the device has caught
    up with everything queued before it, so the GPU then idles while the host queues the next kernels; a
    training step bound by the host (see benchmarks/results) pays for every one. On the CPU they cost
    nothing, but they are the same calls, so counting them here shows what a GPU would wait for.

    Each read is filed under the innermost calling frame outside torch (``path:line``, path from
    ``site-packages`` or the repository) and under the phase it happened in: ``step`` inside a
    training step, ``log`` in the Trainer's logging, saving and evaluation between steps, ``data`` while
    batches are drawn and collated (host tensors: no wait), ``other`` anywhere else (model loading, the
    evaluation before training, saving at the end).
    """

    def __init__(self):
        import collections

        from torch.overrides import TorchFunctionMode

        counter = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", None)
                if name in HOST_READS or name in DATA_SIZED or (name == "__getitem__" and _bool_index(args)):
                    counter._record(name)
                return func(*args, **(kwargs or {}))

        self.sites: collections.Counter = collections.Counter()  # (phase, site, method) -> reads
        self._mode = _Mode()

    def _record(self, method: str) -> None:
        import sys

        frame, site, phase = sys._getframe(2), None, "other"
        while frame is not None:
            path = frame.f_code.co_filename
            if site is None and "/torch/" not in path and path != __file__:
                site = f"{path.split('site-packages/')[-1]}:{frame.f_lineno}"
            name = frame.f_code.co_name
            if "/torch/utils/data/" in path or path.endswith(_BATCH_ASSEMBLY):
                phase = "data"  # samplers and collators: tensors on the host, read without waiting for a GPU
                break
            if name in ("_maybe_log_save_evaluate", "evaluate", "_save_checkpoint"):
                phase = "log"
                break
            if name == "_inner_training_loop":
                phase = "step"
                break
            frame = frame.f_back
        self.sites[(phase, site or "?", method)] += 1

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def in_steps(self) -> dict:
        """Reads inside training steps, by ``site (method)``."""
        return {f"{site} ({method})": n for (phase, site, method), n in self.sites.items() if phase == "step"}
