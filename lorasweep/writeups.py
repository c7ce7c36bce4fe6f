"""Figures reported by the write-ups in shared/reference/writeups.md, as data for the report.

As reported (``decimals``: how many each figure was given with); hardware differed between write-ups and was
often unstated.
"""

WRITEUPS = {
    "W2": {
        "setup": "opt-350m, sahil2801/CodeAlpaca-20k (50% of train), LoRA q/k/v, alpha = 4r, dropout 0.1",
        "hardware": "NVIDIA L4 24 GB",
        "memory_kind": "mean GPU memory allocated (% of 22.5 GB, converted to GB)",
        "runs": {
            "lora-r8": {"train_runtime_s": 761.33, "train_loss_last": 1.72, "memory_gb": 0.188 * 22.5},
            "lora-r128": {"train_runtime_s": 822.99, "train_loss_last": 1.43, "memory_gb": 0.199 * 22.5},
            "lora-r256": {"train_runtime_s": 907.40, "train_loss_last": 1.33, "memory_gb": 0.206 * 22.5},
        },
        "train_loss_kind": "final logged train loss",
        # decimals each figure was given with (the report shows them so; memory: converted from a share)
        "decimals": {"train_runtime_s": 2, "train_loss_last": 2, "memory_gb": 2},
    },
    "W3": {
        "setup": "opt-350m, lucasmccabe-lmi/CodeAlpaca-20k, TRL SFTTrainer, 3 epochs, ~8 samples per step",
        "hardware": "unstated",
        "memory_kind": "max memory allocated (GB)",
        "runs": {
            "lora-r8": {"train_runtime_s": 2979.73, "train_samples_per_s": 20.158, "train_steps_per_s": 2.520,
                        "train_loss": 1.7972, "memory_gb": 3.1},
            "lora-r128": {"train_runtime_s": 3150.67, "train_samples_per_s": 19.065, "train_steps_per_s": 2.383,
                          "train_loss": 1.7856, "memory_gb": 3.2},
            "lora-r256": {"train_runtime_s": 3377.93, "train_samples_per_s": 17.782, "train_steps_per_s": 2.223,
                          "train_loss": 1.7853, "memory_gb": 3.4},
        },
        "train_loss_kind": "Trainer's train_loss (mean over the run)",
        "decimals": {"train_runtime_s": 2, "train_samples_per_s": 3, "train_steps_per_s": 3, "train_loss": 4,
                     "memory_gb": 1},
    },
}
