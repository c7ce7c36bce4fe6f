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
