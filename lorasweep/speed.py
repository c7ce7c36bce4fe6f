"""Model FLOPs utilisation: how much of the GPU's peak the training step turns into model arithmetic.

Per non-padding token, a forward and backward pass of a dense decoder costs about 6 x N FLOPs when
every weight gets a gradient (full fine-tuning) and about 4 x N when the base weights are frozen
(LoRA, QLoRA: the backward pass still computes activation gradients, not weight gradients); N is the
number of model parameters, attention's s^2 term is left out. MFU = FLOPs per token x tokens/s / peak.
"""

from __future__ import annotations

# dense bf16 tensor-core peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_flops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)


def flops_per_token(total_params: int, full: bool) -> float:
    return (6 if full else 4) * total_params


def mfu(total_params: int, full: bool, tokens_per_s: float, gpu_name: str | None) -> float | None:
    peak = peak_flops(gpu_name)
    return flops_per_token(total_params, full) * tokens_per_s / peak if peak else None


def single_run_config(model: str, train_jsonl, run: str, *, lr: float, device: str, seed: int, **training) -> dict:
    """A validated configuration with one run (``full``, ``lora-r<rank>`` or ``qlora-r<rank>``): what the
    benchmarks train."""
    from .config import validate_config

    method = "full" if run == "full" else run.split("-r")[0]
    rank = [int(run.split("-r")[-1])] if method != "full" else []
    return validate_config({
        "model": {"name_or_path": model}, "dataset": {"source": str(train_jsonl)}, "seed": seed,
        "methods": {"full": {"enabled": method == "full", "learning_rate": lr},
                    "lora": {"ranks": rank if method == "lora" else [], "learning_rate": lr},
                    "qlora": {"ranks": rank if method == "qlora" else [], "learning_rate": lr}},
        # no warmup: the plain recipe (SFTConfig defaults) has none, and the benchmarks compare the training
        # step at equal hyperparameters
        "training": {"device": device, "evals": 1, "warmup_ratio": 0.0, **training},
    })


def train_single_run(model: str, train_jsonl, eval_jsonl, out, run: str, *, lr: float, device: str, seed: int,
                     **training) -> dict:
    """Train one run as the benchmarks do (:func:`single_run_config`, its operational settings, no checkpoints)
    and return its metrics."""
    from .config import operational, run_spec
    from .train import train_run

    cfg = single_run_config(model, train_jsonl, run, lr=lr, device=device, seed=seed, **training)
    return train_run(run_spec(cfg, run), train_jsonl, eval_jsonl, out,
                     operational={**operational(cfg), "checkpoint_steps": 0})


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
