"""Figures (seaborn), one colour per run, the same in every figure."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def run_palette(runs: list[str]) -> dict:
    """Stable colours: full in grey-black, LoRA ranks in blues (light to dark), QLoRA in oranges."""
    import seaborn as sns

    from .config import parse_run

    lora = [r for r in runs if parse_run(r)[0] == "lora"]
    qlora = [r for r in runs if parse_run(r)[0] == "qlora"]
    pal = {"full": "#333333"}
    pal.update(zip(lora, sns.color_palette("Blues", len(lora) + 2)[2:] if lora else []))
    pal.update(zip(qlora, sns.color_palette("Oranges", len(qlora) + 2)[2:] if qlora else []))
    return {r: pal[r] for r in runs}


def memory_column(df: pd.DataFrame) -> tuple[str, str]:
    """The peak-memory figure to plot: CUDA peak allocated when measured, else peak RSS."""
    if "peak_cuda_allocated_bytes" in df and df["peak_cuda_allocated_bytes"].notna().any():
        return "peak_cuda_allocated_bytes", "peak CUDA memory allocated (GiB)"
    return "peak_rss_bytes", "peak resident memory of the process (GiB)"


def _bar(ax, df, col, pal, xlabel, scale=1.0, log=False, fmt="{:.3g}"):
    import seaborn as sns

    values = df[col] * scale
    sns.barplot(x=values, y=df["run"], hue=df["run"], palette=pal, ax=ax, legend=False, orient="h")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("")
    for i, v in enumerate(values):
        ax.text(v, i, " " + fmt.format(v), va="center", fontsize=9)
    ax.margins(x=0.2)


def plot_all(metrics_csv, history_csv, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    df = pd.read_csv(metrics_csv)
    hist = pd.read_csv(history_csv)
    runs = list(df["run"])
    pal = run_palette(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        for ext in ("png", "svg"):
            path = out_dir / f"{name}.{ext}"
            fig.savefig(path, dpi=120 if ext == "png" else None)
            written.append(path)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    train = hist[hist["loss"].notna()] if "loss" in hist else hist.iloc[0:0]
    sns.lineplot(data=train, x="step", y="loss", hue="run", hue_order=runs, palette=pal, ax=axes[0])
    axes[0].set_title("train loss (response tokens)")
    ev = hist[hist["eval_loss"].notna()]
    sns.lineplot(data=ev, x="step", y="eval_loss", hue="run", hue_order=runs, palette=pal, marker="o", ax=axes[1])
    axes[1].set_title("eval loss on the held-out split (step 0 = untrained)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy")
    save(fig, "loss_curves")

    h = 0.45 * len(runs) + 1.2
    fig, ax = plt.subplots(figsize=(7, h))
    _bar(ax, df, "train_runtime_s", pal, "train runtime, evaluation excluded (s)", fmt="{:.1f}")
    save(fig, "runtime")

    fig, ax = plt.subplots(figsize=(7, h))
    _bar(ax, df, "train_tokens_nonpad_per_s", pal, "training throughput (non-padding tokens / s)", fmt="{:,.0f}")
    save(fig, "throughput")

    col, label = memory_column(df)
    fig, ax = plt.subplots(figsize=(7, h))
    _bar(ax, df, col, pal, label, scale=1 / 2**30, fmt="{:.2f}")
    save(fig, "memory")

    fig, ax = plt.subplots(figsize=(7, h))
    _bar(ax, df, "trainable_params", pal, "trainable parameters (log scale)", log=True, fmt="{:,.0f}")
    save(fig, "trainable_params")
    log.info("wrote %d figure files to %s", len(written), out_dir)
    return written
