"""Figures reported by the write-ups in shared/reference/writeups.md, as data for the report.

As reported (``decimals``: how many each figure was given with); hardware differed between write-ups and was
often unstated. ``settings``: what each write-up trained with, as it said (None: not stated), for the report's
settings table beside ours.

Memory, each as the write-up measured it:

- W2's GPU memory is W&B's "GPU Memory Allocated (%)" (``gpu.N.memoryAllocated``): NVML's used memory over the
  card's total, the whole device (the CUDA context and PyTorch's cached blocks included, not only live tensors),
  averaged over the run. Its "22.5 GB" is the L4's 23,034 MiB as W&B shows it: GiB.
- W2's process memory is W&B's process RSS (``proc.memory.rssMB``, the RSS over 2**20: MiB), mean and max.
- W3's "max alloc GB" is ``torch.cuda.max_memory_allocated``, in the unit it gave (GB; 2**30 or 1e9 bytes is not
  said, 7% apart).
"""

WRITEUPS = {
    "W2": {
        "setup": "opt-350m, sahil2801/CodeAlpaca-20k (50% of train), LoRA q/k/v, alpha = 4r, dropout 0.1",
        "hardware": "NVIDIA L4 24 GB",
        "gpu_total_gib": 22.5,  # W&B's "22.5 GB": the L4's 23,034 MiB
        "runs": {
            "lora-r8": {"train_runtime_s": 761.33, "train_loss_last": 1.72, "gpu_used_pct": 18.8,
                        "process_mib_mean": 1898, "process_mib_max": 2402},
            "lora-r128": {"train_runtime_s": 822.99, "train_loss_last": 1.43, "gpu_used_pct": 19.9,
                          "process_mib_mean": 1917, "process_mib_max": 1932},
            "lora-r256": {"train_runtime_s": 907.40, "train_loss_last": 1.33, "gpu_used_pct": 20.6,
                          "process_mib_mean": 1964, "process_mib_max": 2026},
        },
        "train_loss_kind": "final logged train loss",
        # decimals each figure was given with (the report shows them so)
        "decimals": {"train_runtime_s": 2, "train_loss_last": 2, "gpu_used_pct": 1, "process_mib_mean": 0,
                     "process_mib_max": 0},
    },
    "W3": {
        "setup": "opt-350m, lucasmccabe-lmi/CodeAlpaca-20k, TRL SFTTrainer, 3 epochs, ~8 samples per step",
        "hardware": "unstated",
        "runs": {
            "lora-r8": {"train_runtime_s": 2979.73, "train_samples_per_s": 20.158, "train_steps_per_s": 2.520,
                        "train_loss": 1.7972, "peak_alloc_gb": 3.1},
            "lora-r128": {"train_runtime_s": 3150.67, "train_samples_per_s": 19.065, "train_steps_per_s": 2.383,
                          "train_loss": 1.7856, "peak_alloc_gb": 3.2},
            "lora-r256": {"train_runtime_s": 3377.93, "train_samples_per_s": 17.782, "train_steps_per_s": 2.223,
                          "train_loss": 1.7853, "peak_alloc_gb": 3.4},
        },
        "train_loss_kind": "Trainer's train_loss (mean over the run)",
        "decimals": {"train_runtime_s": 2, "train_samples_per_s": 3, "train_steps_per_s": 3, "train_loss": 4,
                     "peak_alloc_gb": 1},
    },
}

# What each write-up trained with, as it said it (None: not stated): the report's settings table
SETTINGS = {
    "W1": {"model, data": "opt-350m, CodeAlpaca-20k", "epochs": None, "examples a step": None, "max length": None,
           "learning rate": None, "LoRA": "r 8 / 128 / 256, every linear layer (all-linear)", "precision": None,
           "hardware": None},
    "W2": {"model, data": "opt-350m, sahil2801/CodeAlpaca-20k, 50% of train", "epochs": None,
           "examples a step": None, "max length": None, "learning rate": None,
           "LoRA": "r 8 / 128 / 256, alpha 4r, dropout 0.1, q_proj, k_proj, v_proj", "precision": None,
           "hardware": "NVIDIA L4 24 GB"},
    "W3": {"model, data": "opt-350m, lucasmccabe-lmi/CodeAlpaca-20k", "epochs": "3",
           "examples a step": "~8 (samples/s over steps/s)", "max length": None, "learning rate": None,
           "LoRA": "r 8 / 128 / 256", "precision": None, "hardware": None},
    "W4": {"model, data": None, "epochs": "1 (max_steps 5000)", "examples a step": "1 × accumulation 4",
           "max length": "256", "learning rate": "2e-4",
           "LoRA": "r 64, alpha 16, dropout 0.1; QLoRA: nf4, double quant off", "precision": "fp16",
           "hardware": None},
}
