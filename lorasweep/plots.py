"""Figures (seaborn), one colour per run, the same in every figure."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from .logs import library_folders_in_workdir

log = logging.getLogger(__name__)

# Every figure the plot rule writes (PNG and SVG), with the caption the reports give it.
FIGURES = {
    "loss_curves": "Train and eval loss over optimizer steps (top) and over non-padding tokens seen (bottom)",
    "tradeoff": "Trade-off: eval loss against peak memory and against train runtime, one point per run",
    "memory": "Peak memory measured, and the memory model's prediction beside it",
    "runtime": "Train runtime (evaluations and checkpoints excluded)",
    "throughput": "Throughput in non-padding tokens per second",
    "trainable_params": "Trainable parameters (log scale)",
}


# The most points a run's (and seed's) train loss curve is drawn with. The real experiment logs ~700 times a run (3
# epochs of CodeAlpaca-20k at batch 8, every 10 steps), each log the mean loss of 10 batches, noisy by more than
# the runs differ: drawn log by log, the curves of five runs (15 lines with seeds) bury each other.
MAX_TRAIN_POINTS = 100


def binned_train_logs(train: pd.DataFrame, max_points: int = MAX_TRAIN_POINTS) -> tuple[pd.DataFrame, int]:
    """The training logs as the loss curves draw them, and ``k``: with more than ``max_points`` logs in a run's seed,
    each point is the mean of ``k`` consecutive logs (their step, tokens seen and loss; the same ``k`` for every line,
    so that the seeds' points share their steps), else the logs as they are (k = 1)."""
    import math

    if train.empty:
        return train, 1
    keys = [train["run"], train["seed"]]
    k = math.ceil(train.groupby(keys, dropna=False).size().max() / max_points)
    if k <= 1:
        return train, 1
    cols = [c for c in ("step", "tokens_nonpad_seen", "loss") if c in train]
    block = train.groupby(keys, dropna=False, sort=False).cumcount().to_numpy() // k
    binned = train.groupby([*keys, block], dropna=False, sort=False)[cols].mean()
    return binned.droplevel(2).reset_index(), k


def run_palette(runs: list[str]) -> dict:
    """Stable colours: full in grey-black, LoRA in blues, QLoRA in oranges, each darker for a higher rank whatever
    the runs' order (runs of one rank, variants, in neighbouring shades, PEFT's defaults lightest)."""
    import seaborn as sns

    from .config import is_plain, parse_run

    def by_rank(method):
        return sorted((r for r in runs if parse_run(r)[0] == method),
                      key=lambda r: (parse_run(r)[1] or 0, not is_plain(r), r))

    lora, qlora = by_rank("lora"), by_rank("qlora")
    pal = {"full": "#333333"}
    pal.update(zip(lora, sns.color_palette("Blues", len(lora) + 2)[2:] if lora else []))
    pal.update(zip(qlora, sns.color_palette("Oranges", len(qlora) + 2)[2:] if qlora else []))
    return {r: pal[r] for r in runs}


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "p", "h", "<", ">", "*"]


def run_markers(runs: list[str]) -> dict:
    """A marker per run, in the runs' order, so that points and eval curves are told apart by shape as well as by
    colour: runs of one method differ only in lightness, and points that overlap (LoRA ranks at about the same
    memory or runtime) show only the top one's colour."""
    return {r: MARKERS[i % len(MARKERS)] for i, r in enumerate(runs)}


def wrapped(run: str, width: int = 20) -> str:
    """A run's name as a tick label: broken after its hyphens into lines of at most ``width`` characters where it
    is longer (a part longer than that keeps its own line). One line of a long name (a variant's options) widens
    the tick labels so far that the panel beside them shrinks and its title or x label hangs over the figure's
    edge, where the saved file cuts it."""
    lines = [""]
    for part in re.findall(r"[^-]*-|[^-]+$", run):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def seeds_text(n_seeds: pd.Series) -> str:
    """How many seeds the runs had, for a figure's title: ``'3 seeds'`` when every run had that many, ``'2–3 seeds'``
    when they differ (a run that lost a seed), not the most of any run as if every run had it."""
    low, high = int(n_seeds.min()), int(n_seeds.max())
    return f"{high} seeds" if low == high else f"{low}–{high} seeds"


def _bar(ax, per_seed, col, pal, xlabel, runs, log=False, fmt="{:.3g}"):
    """One bar per run at its figure over seeds as the tables give it (:func:`lorasweep.findings.by_run`: the mean;
    a rate pooled over the seeds), with ± one standard deviation of the seeds' values as error bars (replicates)."""
    from .findings import RATES, by_run

    agg = by_run(per_seed).set_index("run")
    means, sd = agg[col].reindex(runs), agg[f"{col}_sd"].reindex(runs)
    replicates = agg["n_seeds"].max() > 1 and sd.fillna(0).gt(0).any()  # seeds that differ (not a parameter count)
    y = list(range(len(runs)))
    ax.barh(y, means, color=[pal[r] for r in runs], height=0.8)
    if replicates:
        for i, run in enumerate(runs):  # one error bar per run
            if pd.notna(sd[run]):
                ax.errorbar(means[run], i, xerr=sd[run], color="#333333", capsize=4, elinewidth=1.2, fmt="none")
    ax.set_yticks(y, [wrapped(r) for r in runs])
    ax.set_ylim(len(runs) - 0.5, -0.5)  # the first run on top
    if log:
        ax.set_xscale("log")
    how = ("pooled over seeds: their summed counts / summed runtime\n± sd of the seeds' own rates" if col in RATES
           else "mean ± sd over seeds")
    ax.set_xlabel(xlabel + (f"\n{how}" if replicates else ""))  # a line of its own: 7 in. wide
    ax.set_ylabel("")
    ends = means + sd.fillna(0)  # labels clear of the error bars
    for i, run in enumerate(runs):
        ax.text(ends[run], i, " " + fmt.format(means[run]), va="center", fontsize=9)
    ax.margins(x=0.2)
    if not log and (means.dropna() >= 0).all():
        ax.set_xlim(left=0)  # a wide sd draws no negative runtime or rate


# Told apart with a colour-vision deficiency too: the AdamW state sits between the weights and the activations in a
# bar, where seaborn's orange (#dd8452) beside its green read as one colour with protanopia (CIEDE2000 4.8 in
# Machado et al.'s simulation); Okabe and Ito's orange keeps every pair >= 12 apart with any dichromacy.
COMPONENT_COLOURS = {"weights": "#9e9e9e", "gradients_beyond_activations": "#4c72b0", "optimizer": "#e69f00",
                     "activations": "#55a868"}
COMPONENT_LABELS = {"gradients_beyond_activations": "gradients beyond the activations", "optimizer": "AdamW state"}


def memory_parts(df: pd.DataFrame) -> dict:
    """What the memory figure compares, by device: CUDA peaks as they are, CPU as growth over the load footprint.

    CPU RSS includes the Python runtime and libraries (hundreds of MB) that no model of training
    memory predicts, so on the CPU the model's *increment* (gradients, optimizer, activations) is
    compared with the measured increment ``peak_rss_bytes - rss_at_load_bytes``.
    """
    from .findings import memory_measure

    if memory_measure(df)[0] == "peak_cuda_allocated_bytes":
        return {"cuda": True, "at_load": df["cuda_allocated_at_load_bytes"], "peak": df["peak_cuda_allocated_bytes"],
                "compared": df["peak_cuda_allocated_bytes"],
                "components": ["weights", "optimizer", "activations", "gradients_beyond_activations"],
                "measured_label": "peak CUDA allocated", "compared_label": "peak CUDA memory allocated (GiB)"}
    return {"cuda": False, "at_load": df["rss_at_load_bytes"], "peak": df["peak_rss_bytes"],
            "compared": df["peak_rss_bytes"] - df["rss_at_load_bytes"],
            "components": ["optimizer", "activations", "gradients_beyond_activations"],
            "measured_label": "peak RSS", "compared_label": "memory added by training: peak RSS − RSS at load (GiB)"}


def _legend_below(ax, ncol: int, handles=None):
    """The panel's legend under it, clear of its tick labels and x label whatever their height: a fixed share of the
    panel's height put it over a two-line x label (replicate seeds' "mean of 3 seeds ± sd") in a short figure (a
    sweep of three runs or fewer), and over a one-line label with one run. The gap is in inches, which the
    figure's tight layout keeps (it moves and shrinks the panel, not its labels)."""
    from matplotlib.transforms import ScaledTranslation

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    below = (ax.get_window_extent(renderer).y0 - ax.xaxis.get_tightbbox(renderer).y0) / fig.dpi + 0.05
    return ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=ncol, frameon=False,
                     bbox_transform=ax.transAxes + ScaledTranslation(0, -below, fig.dpi_scale_trans))


def _memory_figure(df, runs, pal, plt, h, per_seed=None):
    """Left: measured peak split into load footprint and training's addition. Right: memory model vs measured.
    ``df``: one row per run (:func:`lorasweep.findings.by_run`); with replicate seeds the bars and points are the
    means over seeds and ``per_seed`` (the per-seed table) gives their sd as error bars."""
    from matplotlib.patches import Patch

    from .findings import signed

    parts = memory_parts(df)
    fig, axes = plt.subplots(1, 2, figsize=(13, h + 1.2))
    y = range(len(runs))
    gib = 2**30
    load, peak = parts["at_load"] / gib, parts["peak"] / gib
    n_seeds = int(df["n_seeds"].max()) if "n_seeds" in df else 1
    peak_sd = compared_sd = None
    if per_seed is not None and n_seeds > 1:  # the seeds' sd of each measured figure, in df's run order
        seeded = memory_parts(per_seed)
        sd = lambda v: v.groupby(per_seed["run"]).std(ddof=1).reindex(df["run"]).to_numpy() / gib  # noqa: E731
        peak_sd, compared_sd = sd(seeded["peak"]), sd(seeded["compared"])
    mean = f"mean of {seeds_text(df['n_seeds'])} ± sd" if n_seeds > 1 else ""
    ax = axes[0]
    ax.barh(y, load, color=[pal[r] for r in runs], alpha=0.35)
    ax.barh(y, peak - load, left=load, color=[pal[r] for r in runs])
    if peak_sd is not None:
        ax.errorbar(peak, list(y), xerr=peak_sd, fmt="none", color="#333333", capsize=3, elinewidth=1)
    for i, v in enumerate(peak):
        ax.text(v + (0 if peak_sd is None or pd.isna(peak_sd[i]) else peak_sd[i]), i, f" {v:.3f}", va="center",
                fontsize=9)
    ax.set_yticks(list(y), [wrapped(r) for r in runs])
    ax.invert_yaxis()
    ax.set_xlabel(f"{parts['measured_label']} (GiB)" + (f"\n{mean}" if mean else ""))
    ax.set_title(f"measured: {parts['measured_label']}" + (f" ({mean})" if mean else ""))
    # the legend says what the shades mean, in grey: in a run's colour it read as that run (the first one's, pale
    # at load where that is the lightest blue)
    _legend_below(ax, ncol=2, handles=[Patch(color="#555555", alpha=0.35, label="at load (model, runtime)"),
                                       Patch(color="#555555", label="added by training")])
    ax.margins(x=0.2)

    ax = axes[1]
    left = pd.Series(0.0, index=df.index)
    for comp in parts["components"]:
        col = f"predicted_{comp}_bytes"
        if col not in df or not (df[col].fillna(0) > 0).any():  # no bar of it: no legend entry either
            continue
        vals = df[col].fillna(0) / gib
        ax.barh(y, vals, left=left, color=COMPONENT_COLOURS[comp], height=0.6,
                label=f"predicted: {COMPONENT_LABELS.get(comp, comp)}")
        left = left + vals
    measured = parts["compared"] / gib
    if compared_sd is not None:
        ax.errorbar(measured, list(y), xerr=compared_sd, fmt="none", color="black", capsize=3, elinewidth=1, zorder=3)
    ax.scatter(measured, list(y), marker="D", color="black", zorder=3, label="measured")
    for i, (m, p) in enumerate(zip(measured, left)):
        err = 100 * (p - m) / m if m else float("nan")
        spread = 0 if compared_sd is None or pd.isna(compared_sd[i]) else compared_sd[i]
        ax.text(max(m + spread, p), i, f"  {signed(err, '+.0f')}%", va="center", fontsize=9)  # clear of the error bar
    ax.set_yticks(list(y), [wrapped(r) for r in runs])
    ax.invert_yaxis()
    ax.set_xlabel(parts["compared_label"] + (f"\n◆ {mean}" if mean else ""))
    ax.set_title("memory model (bars) vs measured (◆); label: model error")
    _legend_below(ax, ncol=4)
    ax.margins(x=0.25)
    return fig


def _name_diverged(legend, diverged: list[str]) -> None:
    """Legend entries of runs whose eval loss is not a number (they draw no point or line) say so."""
    for text in legend.get_texts():
        if text.get_text() in diverged:
            text.set_text(f"{text.get_text()} (diverged: loss not finite)")


MEMORY_LABELS = {"peak_cuda_allocated_bytes": "peak CUDA allocated",
                 "peak_rss_above_start_bytes": "peak RSS above the process before its model loaded",
                 "peak_rss_bytes": "peak RSS"}


def _tradeoff_figure(df, runs, pal, plt, sns, diverged=()):
    """Eval loss against peak memory and against runtime, one point per run; lower-left is better."""
    from .findings import memory_measure

    # the memory the findings compare (on the CPU without the ~0.5 GiB runtime every run holds alike, which
    # in a total squeezes the runs' differences into a few pixels)
    mem = memory_measure(df)[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    data = df.assign(peak_gib=df[mem] / 2**30)
    if f"{mem}_sd" in data:
        data["peak_gib_sd"] = data[f"{mem}_sd"] / 2**30
    base = df.loc[~df["run"].str.startswith("qlora"), "base_eval_loss"]
    replicated = "eval_loss_sd" in data and data["eval_loss_sd"].notna().any()
    spread = f"\nmean ± sd over {seeds_text(df['n_seeds'])} (error bars, both axes)" if replicated else ""
    for ax, x, xlabel in [(axes[0], "peak_gib", f"{MEMORY_LABELS[mem]} (GiB)"),
                          (axes[1], "train_runtime_s", "train runtime, evals and checkpoints excluded (s)")]:
        if replicated:  # ± one sd both ways
            for _, r in data.iterrows():
                ax.errorbar(r[x], r["eval_loss"], xerr=r.get(f"{x}_sd"), yerr=r["eval_loss_sd"], color=pal[r["run"]], capsize=3,
                            lw=1, zorder=1)
        sns.scatterplot(data=data, x=x, y="eval_loss", hue="run", hue_order=runs, palette=pal, style="run",
                        style_order=runs, markers=run_markers(runs), s=120, ax=ax, legend=ax is axes[1],
                        edgecolor="black", zorder=2)
        if len(base):
            ax.axhline(base.median(), ls="--", color="grey", lw=1, label="untrained base")
        right = (data[x] + data.get(f"{x}_sd", pd.Series(0.0, index=data.index)).fillna(0)).max()
        ax.set_xlim(left=0, right=right * 1.15)  # from zero: distances read as the real ratios
        ax.set_xlabel(xlabel)
        ax.margins(y=0.15)
    _name_diverged(axes[1].legend(title="run", loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=9), diverged)
    axes[0].set_ylabel("eval loss after training\n(nats / response token; lower is better)")
    axes[0].set_title("quality vs memory" + spread)
    axes[1].set_title("quality vs time" + spread)
    return fig


def fit_layout(fig) -> None:
    """``tight_layout``, and the figure widened until nothing drawn hangs over its edges. tight_layout lays the
    panels out without the width of their titles and x labels (matplotlib's choice), so a title wider than its
    panel (a panel narrowed by long run names) hung over the figure's edge, where the saved file cut it off."""
    fig.tight_layout()
    cols = max((ax.get_subplotspec().get_gridspec().ncols for ax in fig.axes if ax.get_subplotspec()), default=1)
    for _ in range(5):
        drawn = fig.get_tightbbox()  # inches
        over = max(-drawn.x0, drawn.x1 - fig.get_figwidth())
        if over <= 0:
            return
        # each panel takes 1/cols of the width added, a title centred on it half of that on either side
        fig.set_figwidth(fig.get_figwidth() + 2 * cols * (over + 0.1))
        fig.tight_layout()


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Lay ``fig`` out (:func:`fit_layout`), write it as ``<name>.png`` and ``<name>.svg`` and close it."""
    import matplotlib.pyplot as plt

    fit_layout(fig)
    paths = []
    for ext in ("png", "svg"):
        path = Path(out_dir) / f"{name}.{ext}"
        fig.savefig(path, dpi=120 if ext == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def plot_all(metrics_csv, history_csv, out_dir) -> list[Path]:
    library_folders_in_workdir("MPLCONFIGDIR")  # before matplotlib's import, where the home folder cannot be written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    from .findings import by_run, diverged as diverged_runs

    per_seed = pd.read_csv(metrics_csv)
    diverged = diverged_runs(per_seed)[1]
    df = by_run(per_seed)  # one row per run: means over seeds (the table itself with one seed)
    replicates = df["n_seeds"].max() > 1
    hist = pd.read_csv(history_csv)
    if "seed" not in hist:
        hist = hist.assign(seed=0)
    runs = list(df["run"])
    pal = run_palette(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        written.extend(save_figure(fig, out_dir, name))

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="col")
    train = hist[hist["loss"].notna()] if "loss" in hist else hist.iloc[0:0]
    train, k = binned_train_logs(train)
    ev = hist[hist["eval_loss"].notna()]
    for row, (x, xlabel) in enumerate([("step", "optimizer step"),
                                       ("tokens_nonpad_seen", "non-padding tokens seen")]):
        # over steps: mean over seeds with a ± sd band; over tokens (which differ between seeds): one line per seed
        spread = {"errorbar": "sd"} if row == 0 else {"units": "seed", "estimator": None}
        sns.lineplot(data=train, x=x, y="loss", hue="run", hue_order=runs, palette=pal, ax=axes[row, 0],
                     legend=False, **spread)
        # the eval curves' few points marked with each run's marker, which the legend shows beside its colour
        sns.lineplot(data=ev, x=x, y="eval_loss", hue="run", hue_order=runs, palette=pal, style="run",
                     style_order=runs, markers=run_markers(runs), dashes=False, ax=axes[row, 1], legend=row == 0,
                     **spread)
        for ax in axes[row]:
            ax.set_xlabel(xlabel)
            ax.set_ylabel("cross-entropy (nats / token)")
    if replicates:
        fig.suptitle(f"{seeds_text(df['n_seeds'])} per run: top, mean ± sd band; bottom, one line per seed")
    axes[0, 0].set_title("train loss (response tokens)" + (f"\neach point the mean of {k} consecutive logs" if k > 1
                                                            else ""))
    axes[0, 1].set_title("eval loss on the held-out split (first point: untrained)")
    _name_diverged(axes[0, 1].legend(title="run", fontsize=9), diverged)
    save(fig, "loss_curves")

    h = 0.45 * len(runs) + 1.2
    fig, ax = plt.subplots(figsize=(7, h))
    _bar(ax, per_seed, "train_runtime_s", pal, "train runtime, evals and checkpoints excluded (s)", runs, fmt="{:.1f}")
    save(fig, "runtime")

    fig, ax = plt.subplots(figsize=(7, h))
    _bar(ax, per_seed, "train_tokens_nonpad_per_s", pal, "training throughput (non-padding tokens / s)", runs,
         fmt="{:,.0f}")
    save(fig, "throughput")

    save(_memory_figure(df, runs, pal, plt, h, per_seed), "memory")

    fig, ax = plt.subplots(figsize=(7, h))
    _bar(ax, per_seed, "trainable_params", pal, "trainable parameters (log scale)", runs, log=True, fmt="{:,.0f}")
    save(fig, "trainable_params")
    save(_tradeoff_figure(df, runs, pal, plt, sns, diverged), "tradeoff")
    log.info("wrote %d figure files to %s", len(written), out_dir)
    return written
