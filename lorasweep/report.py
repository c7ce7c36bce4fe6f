"""The Markdown report: sections built from results/metrics.csv, executed by papermill, exported by nbconvert.

Every function here returns Markdown text computed from the tables, so the notebook template only
calls them and displays the result, and tests can check the text without running a notebook.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import site
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from . import findings as F
from .logs import library_folders_in_workdir
from .plots import FIGURES, memory_parts
from .resume import written_whole
from .writeups import SETTINGS, WRITEUPS

log = logging.getLogger(__name__)

GIB = 2**30


def _num(v, fmt="{:.4g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def _signed_pct(v) -> str:
    """'+3%', '−2%' (:func:`findings.signed`), "–" for none."""
    return _num(v) if v is None or (isinstance(v, float) and math.isnan(v)) else F.signed(v, "+.0f") + "%"


def _pm(r: pd.Series, col: str, show) -> str:
    """:func:`findings.pm` with a formatting function, "–" where the column is missing."""
    return F.pm(r, col, show) if col in r and not pd.isna(r[col]) else show(None)


def _gib(v) -> str:
    return _num(None if v is None or pd.isna(v) else v / GIB, "{:.3f} GiB")


def _bytes(v) -> str:
    """Three significant figures in the unit that fits (``findings.mib``): a tiny model's 24 KiB of gradients
    is not "0.000 GiB" beside another run's 774 KiB."""
    return "–" if v is None or pd.isna(v) else F.mib(v)


def load(metrics_csv, history_csv, data_summary, eval_losses_csv=None) -> dict:
    per_seed = pd.read_csv(metrics_csv)
    return {
        "metrics": F.by_run(per_seed),  # one row per run: means over seeds, <column>_sd their spread
        "metrics_per_seed": per_seed,
        "history": pd.read_csv(history_csv),
        "data": json.loads(Path(data_summary).read_text()),
        "eval_losses": pd.read_csv(eval_losses_csv) if eval_losses_csv and Path(eval_losses_csv).exists() else None,
    }


RANDOM_WEIGHTS = ("**The model's weights are random** (built by the workflow, `model.build_tiny`, not pretrained): its "
                  "losses and samples show how each method trains it from scratch, not how it fine-tunes a pretrained "
                  "model; its speed and memory are those of its shape. ")


def _seeds_trained(df: pd.DataFrame) -> str:
    """Which seeds each run trained with: ``each trained with 3 seeds (0,1,2)``, and the runs that had fewer (a seed
    lost or not yet trained) named with theirs, not the most of any run said as if every run had it."""
    most = int(df["n_seeds"].max())
    fewer = df[df["n_seeds"] < most]
    return (f"each trained with {most} seeds ({df.loc[df['n_seeds'] == most, 'seeds'].iloc[0]})"
            + "".join(f"{', except' if i == 0 else ','} `{r.run}` with {int(r.n_seeds)} ({r.seeds})"
                      for i, r in enumerate(fewer.itertuples())))


def title_section(ctx: dict, experiment: str, random_weights: bool = False) -> str:
    """``random_weights``: the sweep's model was built with random weights (``model.build_tiny``). ``experiment`` (the
    config's title) is shown as written, on the heading's one line (:func:`_text`)."""
    df, data = ctx["metrics"], ctx["data"]
    methods = [name for method, name in (("full", "full fine-tuning"), ("lora", "LoRA"), ("qlora", "QLoRA"))
               if "method" not in df or (df["method"] == method).any()]
    return (f"# {_text(experiment)}: {' vs '.join(methods)}\n\n"
            f"`{df['model'].iloc[0]}` on `{data['source']}`, runs {', '.join(f'`{r}`' for r in df['run'])}, "
            + (f"{_seeds_trained(df)} (figures are means over "
               "the seeds, ± one standard deviation across seeds, the sample sd with n − 1; rates are pooled over "
               "the seeds and perplexity is that of the mean loss, as Results says), " if df["n_seeds"].max() > 1
               else "")
            + f"on {df['hardware'].iloc[0]}. " + (RANDOM_WEIGHTS if random_weights else "")
            + "Every number below is read from `results/metrics.csv`; "
            "the executed notebook `summary.ipynb` beside this file holds the code that produced it.")


SHORT_RUN_S = 60.0


def short_runs_caveat(df: pd.DataFrame) -> str:
    """A caution for timings of runs that trained for under a minute, measured once each."""
    if df["n_seeds"].max() > 1 or not (df["train_runtime_s"].median() < SHORT_RUN_S):
        return ""
    who = (f"These runs trained for under {SHORT_RUN_S:.0f} s each" if df["train_runtime_s"].max() < SHORT_RUN_S
           else f"Most of these runs trained for under {SHORT_RUN_S:.0f} s (median "
                f"{df['train_runtime_s'].median():.0f} s)")
    return (f" {who}: a single timing of a run that short can move between reruns on the same machine by more "
            "than the differences between runs here. Read their timing differences as indicative; "
            "`seeds: [0, 1, 2]` measures the spread.")


def findings_section(ctx: dict) -> str:
    df, ev = ctx["metrics"], ctx["eval_losses"]
    per_seed = ctx.get("metrics_per_seed", df)  # the findings look at every seed before averaging
    out = ["## Findings", "",
           "Computed from `results/metrics.csv` and the per-example eval losses in `results/eval_losses.csv`. "
           "Differences in eval loss come with a 95% confidence interval from a paired comparison over the same "
           "held-out examples; when it contains zero the runs are called *not distinguishable*. "
           + ("It covers both the choice of eval examples and seed-to-seed variation of training (Student's t "
              "over the seeds). Timings and memory are means over seeds (rates pooled: the seeds' counts over "
              "their summed runtime): "
              if df["n_seeds"].max() > 1 else
              "It covers the choice of eval examples, not seed-to-seed variation of training (set `seeds: "
              "[0, 1, 2]` for that). Timings and memory are single measurements: ")
           + f"differences under {F.TIME_TOL:.0%} (time) and {F.mem_tol_text(F.memory_measure(df)[0])} (memory)"
           + " are called *about the same*"
           + ("; larger ones inside the seeds' spread (the 95% interval of the difference of two runs' means, "
              "Student's t) *not distinguishable from the seeds' spread*" if df["n_seeds"].max() > 1 else "")
           + "." + rss_noise_note(df) + short_runs_caveat(df), ""]
    out += [f"- {p}" for p in F.findings(per_seed, ev)]
    return "\n".join(out)


def tradeoffs_section(ctx: dict) -> str:
    lines = F.tradeoffs(ctx.get("metrics_per_seed", ctx["metrics"]))
    if not lines:
        return ""
    return "\n".join(["## LoRA's trade-offs in this sweep", "",
                      "Each adapter run against full fine-tuning, on this model, data and hardware:", ""]
                     + [f"- {p}" for p in lines])


def memory_model_section(df: pd.DataFrame) -> str:
    """Predicted memory by component beside the measurement, the model's assumptions and its error."""
    parts = memory_parts(df)
    rows = []
    for i, r in df.iterrows():
        pred = r.get("predicted_peak_bytes" if parts["cuda"] else "predicted_train_increment_bytes")
        meas = parts["compared"].loc[i]
        rows.append({"run": r["run"],
                     "weights": _bytes(r.get("predicted_weights_bytes")),
                     "gradients": _bytes(r.get("predicted_gradients_bytes")),
                     "AdamW state": _bytes(r.get("predicted_optimizer_bytes")),
                     "activations": _bytes(r.get("predicted_activations_bytes")),
                     "predicted": _bytes(pred), "measured": _bytes(meas),
                     "error": _signed_pct(100 * (pred - meas) / meas if meas and pd.notna(pred) else None)})
    compared = ("the predicted peak (weights + AdamW state + the larger of activations and gradients) against "
                "`peak_cuda_allocated_bytes`" if parts["cuda"] else
                "the predicted training increment (AdamW state + the larger of activations and gradients) against "
                "what training "
                "added to the process: `peak_rss_bytes − rss_at_load_bytes`. The weights column is shown for "
                "reference; it is inside the load footprint")
    seeds = "n_seeds" in df and df["n_seeds"].max() > 1
    notes = [
        "",
        f"Compared: {compared}."
        + (" With replicate seeds every figure here is the mean over the seeds (the runs' spread: the results "
           "table's ±, the memory figure's error bars)." if seeds else ""),
        "",
        "Assumptions of the model (`lorasweep/memory_model.py`):",
        "",
        "- weights at their storage dtype: fp32 4 bytes per parameter; with 16-bit training a LoRA run's frozen "
        "linear weights 2 bytes (`training.frozen_weights_16bit`: autocast computes with 16-bit copies of them "
        "anyway); a 4-bit layer 0.5 byte per weight plus one fp32 absmax per 64 weights;",
        "- gradients (4 bytes) and AdamW's two moments (8 bytes) for trainable parameters only;",
        "- activations: the bytes autograd keeps for the backward pass (saved tensors that are not parameters "
        "and still held when the forward pass ends, each storage once), counted on the trained model itself, "
        "in its training mode, precision and device, "
        "with three probe batches of 32, 64 and 128 tokens (a quarter, half and all of a model's positions where "
        "it has fewer than 128) and scaled to the longest padded batch fed as "
        "f + b·(a·s + c·s²) (c: attention matrices, kept by eager attention only; f: autocast's 16-bit copies "
        "of the weights stored in fp32): what the architecture, the method, dropout and precision really keep; "
        "plus the working memory of TRL's chunked loss over the LM head (no b·s·V logits are built): a tile of up to "
        "4,096 positions × 32,768 vocabulary columns at the compute dtype (CUDA), with 7.25 fp32 tiles of "
        "temporaries more in its CPU fallback;",
        "- gradients and activations do not peak together: autograd creates each layer's weight gradients as "
        "it frees that layer's saved tensors, and the Trainer frees the gradients between steps, so the peak "
        "holds the larger of the two (both with gradient accumulation, whose first micro-batches' gradients "
        "wait beside the next one's activations);",
        "- nothing for allocator caching, fragmentation, framework workspaces or (on the CPU) memory the "
        "allocator reuses without returning it: the error column shows how much that is on this machine. On "
        "the CPU, glibc keeps freed large tensors when its mmap threshold has risen, more for LoRA's many "
        "short-lived tensors than for full fine-tuning's; `export MALLOC_MMAP_THRESHOLD_=1048576` before "
        "`snakemake` makes the RSS follow live memory, at slower steps (README, What the numbers mean).",
    ]
    return "## Memory: measured and predicted\n\n" + _table(rows) + "\n" + "\n".join(notes)


def _table(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)  # "4.3900" stays "4.3900"


def commit_text(per_seed: pd.DataFrame) -> str:
    """The workflow commit the runs were trained at (each run's, when they differ; ``unknown`` outside a git
    checkout), and the runs trained from a tree with uncommitted changes."""
    commits = per_seed.get("git_commit", pd.Series(None, index=per_seed.index)).astype(object).fillna("unknown")
    runs = per_seed.groupby(commits, sort=False)["run"].unique()
    text = (f"workflow commit `{str(runs.index[0])[:10]}`" if len(runs) == 1 else "workflow commits "
            + ", ".join(f"`{str(c)[:10]}` ({', '.join(f'`{r}`' for r in rs)})" for c, rs in runs.items()))
    if list(runs.index) == ["unknown"]:
        return "workflow commit unknown (not trained from a git checkout)"
    dirty = (per_seed["git_dirty"].astype(str).eq("True") if "git_dirty" in per_seed
             else pd.Series(False, index=per_seed.index))
    if dirty.all():
        return text + " with uncommitted changes"
    if dirty.any():
        return text + "; trained with uncommitted changes: " + ", ".join(
            f"`{r}`" for r in per_seed.loc[dirty, "run"].unique())
    return text


def model_text(per_seed: pd.DataFrame) -> str:
    """The model, the revision asked for, and what the runs loaded: the hub commit and the fingerprint of its files,
    each run's where they differ (an upstream update or new files under the same path between two runs' training),
    which the text says outright: those runs did not fine-tune the same model."""
    first = per_seed.iloc[0]
    text = f"`{first['model']}`"
    if isinstance(first.get("model_revision"), str):
        text += f" at revision `{first['model_revision']}`"
    if "model_files_sha256" not in per_seed:
        return text  # runs trained before lorasweep recorded it
    files = per_seed["model_files_sha256"].astype(object)
    unknown = ", ".join(dict.fromkeys(f"`{r}`" for r in per_seed.loc[files.isna(), "run"]))
    unrecorded = f"; not recorded by {unknown} (trained before lorasweep recorded it)" if unknown else ""
    known = per_seed[files.notna()]
    if known.empty:
        return text
    commits = known.get("model_commit", pd.Series(None, index=known.index)).astype(object)
    groups = known.groupby(files[files.notna()], sort=False)
    label = {fp: (f"commit `{str(commits[g.index].dropna().iloc[0])[:10]}`, " if commits[g.index].notna().any() else "")
             + f"files `{str(fp)[:12]}`" for fp, g in groups}
    if len(label) == 1:
        return text + f" ({next(iter(label.values()))}{unrecorded})"
    runs = {fp: ", ".join(dict.fromkeys(f"`{r}`" for r in g["run"])) for fp, g in groups}
    return (text + ". **The runs loaded different model files**: " + "; ".join(f"{label[fp]}: {runs[fp]}" for fp in label)
            + unrecorded + ". They did not fine-tune the same model, so their comparison is not like with like: "
            "retrain the older ones (`--forcerun` their metrics.json), or pin `model.revision` to a commit")


def hyperparameters(df: pd.DataFrame, per_seed: pd.DataFrame | None, cols: list[str]) -> pd.DataFrame:
    """One row per run of ``cols`` as each seed trained it, not averaged over seeds (a mean writes 0.1 as
    0.10000000000000002, and a batch one seed's out-of-memory retry halved as 6): a value all seeds share, else
    each seed's in order ("8, 4")."""
    hp = df[cols].astype(object)
    if per_seed is None or "seed" not in per_seed or "run" not in per_seed:
        return hp
    rows = per_seed.sort_values("seed", kind="stable").groupby("run", sort=False)
    for c in cols:
        if c in ("run", "seeds", "seed") or c not in per_seed:
            continue
        values = rows[c].agg(lambda v: list(dict.fromkeys(x for x in v if not pd.isna(x))))
        hp[c] = [(vals[0] if len(vals) == 1 else ", ".join(map(str, vals)) if vals else None)
                 if run in values.index else old
                 for run, old, vals in zip(df["run"], hp[c], (values.get(r, []) for r in df["run"]))]
    return hp.astype(object)  # a column of numbers and "8, 4" strings, filled with "–" where missing


def rss_noise_note(df: pd.DataFrame) -> str:
    """Where the CPU's memory floor comes from, when the findings compare resident memory."""
    if "rss" not in F.memory_measure(df)[0]:
        return ""
    return (f" On the CPU, {F.mib(F.RSS_NOISE_BYTES)} is the measure's own noise: the same run trained again, "
            "identically, peaked up to 19.7 MiB apart on this project's 2-core machine (the allocator, not "
            "training; `benchmarks/rss_noise.py` measures it on yours).")


def length_text(per_seed: pd.DataFrame) -> str:
    """What ``training.max_length`` did to the examples (the runs share it and the tokenizer, so the first row
    speaks for all): responses cut there, and examples left out because their prompt alone fills it."""
    keys = ["train_examples_cut_at_max_length", "eval_examples_cut_at_max_length",
            "train_examples_dropped_too_long", "eval_examples_dropped_too_long"]
    if not all(k in per_seed for k in keys) or "max_length" not in per_seed:
        return ""
    counted = per_seed.dropna(subset=[*keys, "max_length"])  # runs trained before these counts have none
    if counted.empty:
        return ""
    r = counted.iloc[0]
    cut_t, cut_e, drop_t, drop_e = (int(r[k]) for k in keys)
    text = f" Sequences are cut at `training.max_length` = {int(r['max_length'])} tokens: "
    text += (f"{cut_t:,} training and {cut_e:,} eval examples are longer, trained and scored on their response's "
             "start only" if cut_t or cut_e else "no response is cut")
    if drop_t or drop_e:
        text += (f"; {drop_t:,} training and {drop_e:,} eval examples are left out, their prompt alone filling it "
                 "(no response token to learn or score)")
    return text + "."


def special_text(per_seed: pd.DataFrame) -> str:
    """Examples holding the text of a tokenizer's special token (OPT's ``</s>``, an HTML strikethrough's close):
    read as that token, an EOS inside the text. Nothing when none or not recorded (runs trained before the count)."""
    keys = ["train_examples_with_special_token_text", "eval_examples_with_special_token_text"]
    if not all(k in per_seed for k in keys):
        return ""
    counted = per_seed.dropna(subset=keys)
    if counted.empty or not counted[keys].iloc[0].any():
        return ""
    n_t, n_e = (int(counted[k].iloc[0]) for k in keys)
    return (f" {n_t:,} training and {n_e:,} eval examples hold the text of one of the tokenizer's special tokens "
            "(such as OPT's `</s>`, also an HTML strikethrough's close): the tokenizer reads it as that token, an end of "
            "sequence inside the text, not as text.")


def checkpointing_text(per_seed: pd.DataFrame) -> str:
    """``training.gradient_checkpointing`` as the runs trained with it (it trades training time for activation memory,
    so the runtime and memory figures depend on it): nothing when off or not recorded."""
    if "gradient_checkpointing" not in per_seed:
        return ""
    on = per_seed["gradient_checkpointing"].astype(object).eq(True)
    if not on.any():
        return ""
    if on.all():
        return "; gradient checkpointing on (activations recomputed in the backward pass: less memory, more time)"
    runs = ", ".join(dict.fromkeys(f"`{r}`" for r in per_seed.loc[on, "run"]))
    return (f"; gradient checkpointing on for {runs} only (less memory, more time: their runtime and memory do not "
            "compare with the others')")


def setup_section(ctx: dict) -> str:
    df, data = ctx["metrics"], ctx["data"]
    first = df.iloc[0]
    lines = [
        "## Setup",
        "",
        f"- **Model**: {model_text(ctx.get('metrics_per_seed', df))}",
        f"- **Dataset**: `{data['source']}`"
        + (f" at revision `{data['revision']}`" if data.get("revision") else "")
        + (f" (commit `{data['commit'][:10]}`)" if data.get("commit") and data["commit"] != data.get("revision")
           else "") + (" (fields " + ", ".join(f"{k} ← " + (f"`{v}`" if v else "none") for k, v in data["fields"].items()) + ")"
                       if data.get("fields") else "") + f": {data['records_read']:,} records read, "
        f"{data['dropped_empty_output']} dropped for an empty output, "
        + (f"{data['dropped_duplicates']:,} as exact repeats of another record, " if data.get("dropped_duplicates")
           else "") + f"{data['records_kept']:,} kept; "
        f"eval split {data['eval_examples']:,} records (eval_size {data['eval_size']}), "
        f"train split {data['train_examples']:,} records (fraction {data['fraction']} of the rest), "
        f"drawn with seed {data['seed']}. Data fingerprint `{data['fingerprint_sha256'][:12]}`.",
        f"- **Prompt**: CodeAlpaca's two Alpaca templates ({data['with_input']:,} records with an input); "
        "the loss is computed on the response tokens only." + length_text(ctx.get("metrics_per_seed", df))
        + special_text(ctx.get("metrics_per_seed", df)),
        f"- **Hardware**: {first['hardware']}; precision {first['precision']}"
        + checkpointing_text(ctx.get("metrics_per_seed", df)) + ".",
        f"- **Software**: torch {first['torch_version']}, transformers {first['transformers_version']}, "
        f"peft {first['peft_version']}, trl {first['trl_version']}; {commit_text(ctx.get('metrics_per_seed', df))}.",
        "",
        "Per-run hyperparameters:",
        "",
    ]
    cols = ["run", "method", "rank", "learning_rate", "lora_alpha", "lora_dropout", "target_modules", "lora_init",
            "use_rslora", "use_dora", "quant_type", "batch_size", "grad_accum", "max_length", "train_steps",
            "seeds" if "seeds" in df else "seed"]
    hp = hyperparameters(df, ctx.get("metrics_per_seed"), [c for c in cols if c in df])
    if "quant_type" in hp and "double_quant" in df:  # bitsandbytes' second quantization of the absmax constants
        hp["quant_type"] = [f"{q} + double quant" if isinstance(q, str) and d is True else q
                             for q, d in zip(hp["quant_type"], df["double_quant"].astype(object))]
    for c in ("rank", "lora_alpha", "train_steps", "batch_size", "grad_accum", "max_length", "seed"):
        if c in hp:
            hp[c] = [_num(v, "{:.0f}") if isinstance(v, (int, float)) else v for v in hp[c]]
    if "learning_rate" in hp:  # as config.yaml writes it: 2e-5 beside 2e-4, not "2e-05" beside "0.0002"
        hp["learning_rate"] = [_rate(v) if isinstance(v, float) and math.isfinite(v) else v for v in hp["learning_rate"]]
    lines.append(hp.fillna("–").to_markdown(index=False, disable_numparse=True))  # "2e-5" stays "2e-5"
    lines += ["", "Prompt template (record without an input):", "", "```text", data["prompt_no_input"].rstrip(), "```"]
    return "\n".join(lines)


def results_table(df: pd.DataFrame) -> str:
    rows = []
    cuda = "peak_cuda_allocated_bytes" in df and df["peak_cuda_allocated_bytes"].notna().any()
    bound = "mfu_ceiling_pct" in df and df["mfu_ceiling_pct"].notna().any()
    for _, r in df.iterrows():
        row = {
            "run": r["run"],
            "train loss": F.pm(r, "train_loss"),
            "eval loss": F.pm(r, "eval_loss"),
            "eval ppl": _num(r["eval_perplexity"], "{:.2f}"),
            "runtime s": F.pm(r, "train_runtime_s", "{:.1f}"),
            "samples/s": F.pm(r, "train_samples_per_s", "{:.2f}"),
            "steps/s": F.pm(r, "train_steps_per_s", "{:.3f}"),
            "tokens/s": F.pm(r, "train_tokens_nonpad_per_s", "{:,.0f}"),
            "padding": _num(r.get("padding_share_pct"), "{:.0f}%"),
        }
        if "mfu_pct" in df and df["mfu_pct"].notna().any():
            row["MFU"] = _pm(r, "mfu_pct", lambda v: _num(v, "{:.1f}%"))
        if bound:
            row["MFU bound"] = _num(r.get("mfu_ceiling_pct"), "{:.0f}%")
        if cuda:
            row["peak alloc"] = _pm(r, "peak_cuda_allocated_bytes", _gib)
            row["peak reserved"] = _pm(r, "peak_cuda_reserved_bytes", _gib)
        row["peak RSS"] = _pm(r, "peak_rss_bytes", _gib)
        row["trainable"] = f"{int(r['trainable_params']):,} ({r['trainable_share_pct']:.3g}%)"
        row["saved"] = _bytes(r["saved_model_bytes"])  # in the unit that fits: 25.6 KiB, not 0.02 MiB
        rows.append(row)
    notes = [
        "",
        *(["- With replicate seeds a figure is the mean over seeds, except *eval ppl*, exp of the mean eval loss, "
           "and the rates (*samples/s*, *steps/s*, *tokens/s*" + (", *MFU*" if "mfu_pct" in df and
                                                                 df["mfu_pct"].notna().any() else "")
           + "), pooled: the seeds' summed counts over their summed runtime, the rate of the mean runtime beside "
           "them; *± x* is one standard deviation across seeds, the sample sd (n − 1), for a rate that of the "
           "seeds' own rates; per-seed rows are in `results/metrics.csv`."]
          if "n_seeds" in df and df["n_seeds"].max() > 1 else []),
        "- *train loss*: mean training loss over the run's steps (the Trainer's `train_loss`, as write-up W3 "
        "reports; a run resumed after a crash: over all its steps); "
        "*eval loss*: mean cross-entropy per response token (nats) on the held-out split after training; untrained: "
        + ", ".join(f"{r['run']} {r['base_eval_loss']:.4g}" for _, r in df.iterrows()) + ".",
        "- *runtime*: training wall time with the time of evaluations and of writing checkpoints subtracted; "
        "*tokens/s* counts non-padding tokens (prompt + response) actually fed; *padding*: share of the fed batch "
        "positions that were padding"
        + ("; *MFU*: model FLOPs (4·N + 2·T per token for N parameters, T of them trainable: 6·N for full "
           "fine-tuning, about 4·N with a frozen base; embedding tables, looked up, count nothing, and the LM head "
           "only on the positions with a label, the only ones TRL's fused head projects) per second over "
           "the GPU's dense 16-bit tensor-core peak (bf16; fp16 on a V100 or T4)"
           if "mfu_pct" in df and df["mfu_pct"].notna().any() else "")
        + ("; *MFU bound*: the most MFU this GPU allows at the run's tokens per optimizer step, however fast the "
           "host and the kernels: the step's model FLOPs at the dense peak plus the memory traffic every step has "
           "whatever its batch (each weight read for the forward and backward products, and for trainable ones "
           "their gradient, its clipping and AdamW's update: 58 bytes per trainable weight, 10 per frozen one, 4 "
           "per frozen one stored in 16 bits, with 16-bit autocast) at the GPU's full bandwidth "
           "(`lorasweep.speed.step_ceiling`; README, Speed). Few tokens a step keep it low for full fine-tuning, "
           "whose optimizer moves every weight each step" if bound
           else "") + ".",
        "- *peak RSS*: peak resident memory of the training process after the model was loaded and the peak "
        "was reset" + ("; *peak alloc / reserved*: `torch.cuda` peaks after a reset at the same point" if cuda else
                       " (CPU run: no CUDA figures)") + ". Training only: the evaluations during training are "
        "measured apart (`eval_peak_*` in metrics.csv) and left out, since their memory depends on the eval batch "
        "size, not on the method.",
        *_frozen_base_note(df),
        *_cpu_16bit_rss_note(df),
        "- *trainable*: trainable parameters and their share of the run's own parameters (adapter included, as "
        "PEFT counts it).",
        "- *saved*: adapter file size for LoRA / QLoRA, full model weights for full fine-tuning.",
    ]
    return "## Results\n\n" + _table(rows) + "\n" + "\n".join(notes)


def _cpu_16bit_rss_note(df: pd.DataFrame) -> list[str]:
    """Runs that trained in 16 bits on the CPU: their resident memory holds oneDNN's bf16 kernels, built and kept for
    every batch shape met, more than training's own state (and not the allocator's doing: the glibc remedy the memory
    model's notes give does not remove it)."""
    if "precision" not in df or "device" not in df:
        return []
    runs = df[(df["device"] == "cpu") & df["precision"].isin(["bf16", "fp16"])]
    if runs.empty:
        return []
    return ["- **Peak RSS in 16 bits on the CPU**: " + ", ".join(f"`{r}`" for r in runs["run"]) + " trained with "
            "bf16 autocast on the CPU, whose matrix products (oneDNN) build and keep kernels and buffers for every "
            "batch shape they meet, so the resident memory grows with each new sequence length: more than "
            "training's own state, and differently per method (the tiny preset, 2026-11-28: lora-r8 266 MiB above "
            "its load footprint in bf16 against 56 in fp32, full fine-tuning 220 against 55; with "
            "`torch.backends.mkldnn.enabled = False` the growth was gone; `MALLOC_MMAP_THRESHOLD_` does not remove "
            "it). The memory figures and the memory model's error here measure that cache; compare memory from an "
            "fp32 sweep on the CPU (`training.precision: fp32`), or on a GPU."]


def _frozen_base_note(df: pd.DataFrame) -> list[str]:
    """How the LoRA runs that trained in 16 bits stored their frozen base (``training.frozen_weights_16bit``), and
    a warning where they differ: the setting is operational, so runs finished before a change keep theirs, and
    their memory figures would then compare fp32 bases with 16-bit ones. The same for QLoRA's 4-bit layers (16-bit
    outputs, or bitsandbytes' fp32 ones after a layer norm)."""
    if "method" not in df or "precision" not in df:
        return []
    return _lora_base_note(df) + _qlora_outputs_note(df)


def _qlora_outputs_note(df: pd.DataFrame) -> list[str]:
    qlora = df[(df["method"] == "qlora") & df["precision"].isin(["bf16", "fp16"])]
    if qlora.empty:
        return []
    layers = (qlora["four_bit_16bit_layers"] if "four_bit_16bit_layers" in qlora
              else pd.Series(float("nan"), index=qlora.index))
    dora = qlora["use_dora"].fillna(False).astype(bool) if "use_dora" in qlora else pd.Series(False, index=qlora.index)
    names = lambda mask: ", ".join(f"`{r}`" for r in qlora.loc[mask, "run"])  # noqa: E731
    older = layers.isna()  # trained before lorasweep fed those layers (and recorded it)
    fed = layers.fillna(0) > 0
    off = ~fed & ~older & ~dora  # training.frozen_weights_16bit false
    # a DoRA run adapting every layer (all-linear) has none left to feed: no sign of the setting
    if not fed.any() and (dora & ~older).all():
        return []
    if (fed | (dora & ~older)).all():
        return ["- The QLoRA runs fed their 4-bit layers 16-bit inputs, so that their outputs stay in 16 bits as a "
                "16-bit LoRA base's do (`training.frozen_weights_16bit`; `four_bit_16bit_layers` in metrics.csv): "
                "QLoRA against LoRA compares the 4-bit weights, not also fp32 activations"
                + (f"; the layers DoRA adapts in {names(dora)} return fp32 (DoRA adds its base's output in fp32)."
                   if dora.any() else ".")]
    if off.all():
        return ["- The QLoRA runs returned their 4-bit layers' outputs in fp32 after each layer norm, bitsandbytes' "
                "own way (`training.frozen_weights_16bit: false`): what they keep for the backward pass counts fp32 "
                "where a 16-bit LoRA base's counts 16 bits."]
    why = " and ".join(w for w, mask in (("trained before lorasweep fed those layers 16 bits", older),
                                         ("trained with `training.frozen_weights_16bit: false`", off)) if mask.any())
    return [f"- **QLoRA's memory counts fp32 activations**: {names(older | off)}: each 4-bit layer's output kept in "
            f"fp32 after a layer norm, bitsandbytes' own way ({why}), so what autograd keeps for the backward pass, "
            "and the peak, count fp32 where LoRA's count 16 bits. Rerun with `--forcerun` and the setting on for a "
            "like-for-like comparison; the losses are not affected beyond rounding."]


def _lora_base_note(df: pd.DataFrame) -> list[str]:
    if "frozen_16bit_params" not in df:
        return []
    dora = df["use_dora"].fillna(False).astype(bool) if "use_dora" in df else pd.Series(False, index=df.index)
    converted = df["frozen_16bit_params"].fillna(0) > 0
    # a DoRA run that adapts every linear layer (all-linear) has none left to convert: no sign of the setting
    lora = df[(df["method"] == "lora") & df["precision"].isin(["bf16", "fp16"]) & (converted | ~dora)]
    if lora.empty:
        return []
    half = lora["frozen_16bit_params"].fillna(0) > 0
    if half.all():
        dora_runs = ", ".join(f"`{r}`" for r in lora.loc[dora.loc[lora.index], "run"])
        return ["- The LoRA runs kept their frozen linear weights in 16 bits, the dtype autocast computes with "
                "(`training.frozen_weights_16bit`; `frozen_16bit_params` in metrics.csv): half their bytes, and no "
                "16-bit copies of them kept for the backward pass"
                + (f"; {dora_runs} kept the base of each layer DoRA adapts in fp32 (DoRA normalises base + "
                   "adapter from it)." if dora_runs else ".")]
    if not half.any():
        return ["- The LoRA runs kept their frozen base in fp32 (`training.frozen_weights_16bit: false`)."]
    names = lambda runs: ", ".join(f"`{r}`" for r in runs)  # noqa: E731
    return [f"- **Memory compares unlike runs**: {names(lora.loc[half, 'run'])} kept their frozen linear weights "
            f"in 16 bits, {names(lora.loc[~half, 'run'])} in fp32 (`training.frozen_weights_16bit` differed when "
            "they trained; an operational setting, so changing it retrains nothing). Rerun the latter with "
            "`--forcerun` for comparable memory figures; their losses are not affected."]


def figures_section(figures_dir: str) -> str:
    out = ["## Figures", "", "Colours are fixed per run in every figure: full fine-tuning dark grey, LoRA in blues "
           "and QLoRA in oranges, darker for a higher rank (runs of the same rank, variants such as OLoRA or DoRA, "
           "in neighbouring shades, PEFT's defaults lightest); the trade-off's points and the eval curves also "
           "give each run its own marker.", ""]
    for name, caption in FIGURES.items():
        out += [f"### {caption}", "", f"![{caption}]({figures_dir}/{name}.png)", ""]
    return "\n".join(out)


def _values(series: pd.Series, fmt=str) -> str:
    """The distinct values of a column, in order, formatted and joined ("–" when there are none)."""
    vals = list(dict.fromkeys(fmt(v) for v in series if not pd.isna(v)))
    return ", ".join(vals) if vals else "–"


def _rate(v: float) -> str:
    """A learning rate as the write-ups and config.yaml write it: 2e-4, 1.5e-4."""
    return np.format_float_scientific(float(v), trim="-", exp_digits=1)


def our_settings(per_seed: pd.DataFrame, data: dict | None = None, history: pd.DataFrame | None = None) -> dict:
    """This sweep's settings in the columns of ``writeups.SETTINGS``, as its runs recorded them (``data``: the
    prepared data's summary; ``history``: the training logs, whose last epoch is how many epochs a run trained)."""
    adapters = per_seed[per_seed["method"].isin(["lora", "qlora"])] if "method" in per_seed else per_seed.iloc[:0]
    out = dict.fromkeys(next(iter(SETTINGS.values())), "–")  # the settings table's columns, in its order
    out["model, data"] = (f"{per_seed['model'].iloc[0]}"
                          + (f", {data['source']}, {float(data['fraction']):.0%} of train" if data else ""))
    epochs = None
    if history is not None and {"run", "epoch"} <= set(history.columns):
        epochs = history.groupby("run", sort=False)["epoch"].max().reindex(per_seed["run"].unique())
    if epochs is not None:
        out["epochs"] = _values(epochs, lambda v: f"{v:.3g}")
    if "batch_size" in per_seed:
        accum = per_seed["grad_accum"] if "grad_accum" in per_seed else pd.Series(1, index=per_seed.index)
        out["examples a step"] = _values(pd.Series([f"{int(b)}" + (f" × accumulation {int(a)}" if a > 1 else "")
                                                    for b, a in zip(per_seed["batch_size"], accum.fillna(1))]))
    if "max_length" in per_seed:
        out["max length"] = _values(per_seed["max_length"], lambda v: f"{int(v)}")
    if {"learning_rate", "method"} <= set(per_seed.columns):
        names = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
        out["learning rate"] = "; ".join(
            f"{names.get(m, m)} {_values(g['learning_rate'], _rate)}"
            for m, g in per_seed.groupby("method", sort=False))
    if len(adapters) and {"rank", "lora_alpha", "lora_dropout", "target_modules"} <= set(adapters.columns):
        ranks = " / ".join(str(r) for r in dict.fromkeys(int(r) for r in adapters["rank"]))
        per_rank = (adapters["lora_alpha"] / adapters["rank"]).dropna()
        alpha = (f"alpha {per_rank.iloc[0]:g}r" if len(per_rank) and (per_rank == per_rank.iloc[0]).all()
                 else "alpha " + _values(adapters["lora_alpha"], lambda v: f"{v:g}"))
        out["LoRA"] = (f"r {ranks}, {alpha}, dropout {_values(adapters['lora_dropout'], lambda v: f'{v:g}')}, "
                       + _values(adapters["target_modules"]).replace(",", ", "))
    for col in ("precision", "hardware"):
        if col in per_seed:
            out[col] = _values(per_seed[col])
    return out


def writeups_section(df: pd.DataFrame, eval_losses: pd.DataFrame | None = None,
                     per_seed: pd.DataFrame | None = None, data: dict | None = None,
                     history: pd.DataFrame | None = None, random_weights: bool = False) -> str:
    """Our LoRA runs beside the figures W2 and W3 reported for the same ranks, each figure beside ours of the same
    kind and unit, after the settings each write-up and this sweep trained with; their claims checked against
    every seed (``per_seed``: a seed timed on a busy machine keeps its run out of the timing claims;
    ``random_weights``: the model was built with random weights, which the verdicts on loss then say)."""
    ours = df.set_index("run")
    mem_col, mem_name = F.memory_measure(df)
    cuda = mem_col == "peak_cuda_allocated_bytes"
    settings = [{"source": name, **{k: v or "–" for k, v in s.items()}} for name, s in SETTINGS.items()]
    settings.append({"source": "lorasweep (this sweep)",
                     **our_settings(per_seed if per_seed is not None else df, data, history)})
    rows = []
    columns = {"runtime s": "train_runtime_s", "train loss": "train_loss", "last train loss": "train_loss_last",
               "samples/s": "train_samples_per_s", "steps/s": "train_steps_per_s"}
    for name, w in WRITEUPS.items():
        for run, fig in w["runs"].items():  # each figure with the decimals the write-up gave it
            show = lambda key, unit="": _num(fig.get(key), f"{{:.{w['decimals'].get(key, 2)}f}}{unit}")  # noqa: E731
            used = fig.get("gpu_used_pct")
            rows.append({"source": f"{name} ({w['hardware']})", "run": run,
                         **{head: show(key) for head, key in columns.items()},
                         "peak alloc": show("peak_alloc_gb", " GB"),
                         "mean GPU used": "–" if used is None else
                         f"{show('gpu_used_pct', '%')} = {used / 100 * w['gpu_total_gib']:.2f} GiB",
                         "process MiB, mean / max": "–" if fig.get("process_mib_max") is None else
                         f"{show('process_mib_mean')} / {show('process_mib_max')}"})
    # in the parentheses of "lorasweep (…)", the CPU's own ones a comma clause: "lorasweep (CPU, x86_64, 2 threads)",
    # not "lorasweep (CPU (x86_64, 2 threads))"
    hw = re.sub(r"\s*\((.*)\)$", r", \1", df["hardware"].iloc[0]) if len(df) else "?"
    seeds = "n_seeds" in df and df["n_seeds"].max() > 1
    gib = lambda v: _num(None if v is None else v / GIB, "{:.2f} GiB")  # noqa: E731
    mibs = lambda v: _num(None if v is None else v / 2**20, "{:.0f}")  # noqa: E731
    for run in sorted({r for w in WRITEUPS.values() for r in w["runs"]}, key=lambda r: int(r.split("r")[-1])):
        if run in ours.index:
            r = ours.loc[run]
            rows.append({"source": f"lorasweep ({hw})" + (", mean ± sd over seeds" if seeds else ""), "run": run,
                         "runtime s": _pm(r, "train_runtime_s", lambda v: _num(v, "{:.1f}")),
                         "train loss": _pm(r, "train_loss", lambda v: _num(v, "{:.4f}")),
                         "last train loss": _pm(r, "train_loss_last", lambda v: _num(v, "{:.4f}")),
                         "samples/s": _pm(r, "train_samples_per_s", lambda v: _num(v, "{:.2f}")),
                         "steps/s": _pm(r, "train_steps_per_s", lambda v: _num(v, "{:.3f}")),
                         "peak alloc": _pm(r, "peak_cuda_allocated_bytes", gib),
                         "mean GPU used": _pm(r, "mean_cuda_reserved_bytes", gib),
                         "process MiB, mean / max": f"{_pm(r, 'mean_rss_bytes', mibs)} / "
                                                    f"{_pm(r, 'peak_rss_bytes', mibs)}"})
    notes = [
        "",
        "Each figure sits beside ours of the same kind, in the unit it was given in. *peak alloc*: "
        "`torch.cuda.max_memory_allocated` while training (W3's \"max alloc\", in the GB it gave: whether "
        "2^30 or 10^9 bytes is not said, 7% apart; ours in GiB, evaluations left out). *mean GPU used*: W2's is "
        "W&B's \"GPU memory allocated\" share, NVML's used memory over the card's total (its \"22.5 GB\" is the "
        "L4's 23,034 MiB: GiB), averaged over the run: the whole device, the CUDA context and PyTorch's cached "
        "blocks included, evaluations too; ours is the mean over the training steps of "
        "`torch.cuda.memory_reserved` (PyTorch's cache, which holds every tensor; the CUDA context, a few "
        "hundred MiB that NVML also counts, is not in it). *process*: the training process's resident memory "
        "(W2: W&B's process RSS, whose MB are MiB, mean and max over its samples; ours: the mean over the "
        "training steps and the peak)."
        + ("" if cuda else " This sweep ran on the CPU: it has no CUDA figures, and its resident memory holds "
           "the model and training state a GPU run keeps on the GPU.")
        + " Runtime: theirs is the Trainer's `train_runtime`, evaluations and checkpoint writing included; ours "
        "leaves both out (`train_wall_s` in `results/metrics.csv` includes them), and so do our samples/s and "
        "steps/s, the examples and optimizer steps trained over that runtime (the Trainer's: the same counts over "
        "its `train_runtime`). "
        "*Train loss* is the mean over the run (W3's and ours), *last train loss* the last logged value (the only "
        "one W2 gives; ours: the mean of the run's last `logging_steps` steps). Compare magnitudes only where the "
        "settings above are the same: model, data, epochs (a mean train loss over 3 epochs includes two epochs "
        "of examples seen before), examples a step and hardware. W1's LoRA adapted every linear layer "
        "(all-linear), which its author blames for LoRA's higher memory; this sweep's adapts "
        + (", ".join(sorted({str(t) for t in df.get("target_modules", pd.Series(dtype=object)).dropna()})) or "-")
        + ".",
        "",
        "Their claims, checked against this sweep's measurements"
        + (" (our figures: means over the seeds, rates pooled; ± where given: the seeds' sample sd)" if seeds else "")
        + ". A claim about train loss (W2 gave the last logged value, W3 the mean over the run) is checked on ours "
        "of the same kind; W1's on eval loss, which it charted beside train loss"
        + ("" if cuda else "; a claim about memory on the CPU's " + mem_name + ", where the write-ups measured "
           "CUDA memory")
        + (". This sweep's model has random weights, unlike the pretrained opt-350m the write-ups fine-tuned: its "
           "verdicts on loss say how the methods train it from scratch, not whether the claims hold for fine-tuning"
           if random_weights else "") + ":",
        "",
    ]
    claims = F.writeup_claims(per_seed if per_seed is not None else df, eval_losses)
    table = pd.DataFrame(claims).rename(columns={"ours": "this sweep"}).to_markdown(index=False) if claims else \
        "(none of the write-ups' claims can be checked with these runs: they compare full fine-tuning with " \
        "LoRA, or LoRA ranks with each other, LoRA with PEFT's default options: a variant such as -rslora, -dora, " \
        "-olora or -pissa is not what they trained)"
    return ("## Beside the published write-ups\n\n"
            + "What each trained with, as it said (–: not stated), and this sweep:\n\n" + _table(settings) + "\n\n"
            + DEFAULT_VS_WRITEUPS + "\n\n" + _table(rows) + "\n" + "\n".join(notes) + "\n" + table)


DEFAULT_VS_WRITEUPS = (
    "The default experiment (`config/config.yaml`) follows W2's LoRA (alpha = 4r, dropout 0.1, the attention "
    "projections q/k/v; W1's author recommends q/k/v and out_proj over all-linear) and W3's 8 examples a step. "
    "Where the write-ups differ from each other or say nothing, it chooses, on purpose: the whole training split "
    "(W2 halved it \"for a quick comparison\": `dataset.fraction: 0.5`), one epoch (W3 trained 3, three times as "
    "long: `training.epochs: 3` for its schedule and a mean train loss to set beside its), W4's learning rate "
    "2e-4 for the adapters and 2e-5 for full fine-tuning (W1-W3 do not give theirs), max length 512 (W4: 256; "
    "512 fits more than 99% of CodeAlpaca's records) and bf16 autocast where the GPU has it (W4: fp16). "
    "`methods.lora.target_modules: all-linear` trains W1's adapters.")


def adapters_section(verify_jsons=(), switch_json=None, samples_json=None, first_seed=None) -> str:
    """Merge verification per adapter run, the adapter-switching round trip, and side-by-side samples, all of one
    seed's models (``first_seed``, the sweep's first; else read from the verify files' paths)."""
    from .collect import run_and_seed

    files = [p for p in verify_jsons if Path(p).is_file()]
    rows = [json.loads(Path(p).read_text()) for p in files]
    if first_seed is None:
        found = {run_and_seed(p)[1] for p in files} - {None}
        first_seed = found.pop() if len(found) == 1 else None
    seed = f"seed {first_seed}, the first of the sweep's seeds" if first_seed is not None else "the first seed"
    adapters = bool(rows) or bool(switch_json and Path(switch_json).is_file())
    # a sweep without adapter runs (full fine-tuning only) still has its samples, under a heading of their own
    out = ["## Adapters after training: merge, verify, switch" if adapters else "## Samples", ""]
    if rows:
        out += [f"Each adapter ({seed}) merged into its base with PEFT's `merge_and_unload` (QLoRA onto the "
                "dequantized 4-bit base) and saved as a plain model under `results/runs/<run>/seed<seed>/merged/`, "
                "then compared with base + adapter on held-out examples:", ""]
        out.append(pd.DataFrame([{
            "run": r["run"], "merged onto": r["merged_onto"], "max abs logit diff": f"{r['max_abs_logit_diff']:.2e}",
            "tolerance": f"{r['tolerance']:.0e}", "within": ("not checked: the run diverged" if r.get("diverged")
                                                     else "yes" if r["within_tolerance"] else "**no**"),
            "greedy identical": f"{r['greedy_identical_count']}/{r['prompts']}",
            "eval loss adapter": f"{r['eval_loss_adapter']:.5f}", "eval loss merged": f"{r['eval_loss_merged']:.5f}",
            **({"in training": "–" if r.get("eval_loss_in_training") is None else f"{r['eval_loss_in_training']:.5f}"
                + (" (**differs**)" if r.get("adapter_as_trained") is False else "")}
               if any("eval_loss_in_training" in x for x in rows) else {})}
            for r in rows]).to_markdown(index=False, disable_numparse=True))
        out += ["", "A merge beyond tolerance fails the workflow (a QLoRA merge too: both sides computed on the CPU in "
                "fp32, from the same dequantized weights). A QLoRA merge onto the original full-precision weights "
                "would differ by the quantization error. *In training*: the same examples' eval loss as the run "
                "measured it at its end, in its own precision (bf16 on a GPU moves it a little): the saved adapter "
                "computes what the model that trained computed, or the workflow fails (beyond 1e-4 relative after "
                "fp32 training); after 16-bit training, whose evaluation rounds, a difference beyond 2e-2 is marked "
                "**differs** here and warned of in the verify log, not failed (that bound is not measured on a GPU "
                "yet).", ""]
    if switch_json and Path(switch_json).is_file():
        sw = json.loads(Path(switch_json).read_text())
        out += [f"**Switching** (one full-precision base model, every LoRA adapter ({seed}) attached by "
                f"name with `load_adapter` (QLoRA's need the 4-bit base), "
                f"`set_adapter` in turn, {sw['examples']} held-out examples; base alone: eval loss "
                f"{sw['base_eval_loss']:.5f}): " + "; ".join(
                    f"`{a['adapter']}` {a['eval_loss']:.5f}" for a in sw["adapters"]) + ". After `unload()` the "
                "base model's logits are " + ("identical to the original, bit for bit." if
                                                sw["unload_restores_base_exactly"] else "**not** the original."), ""]
    if samples_json and Path(samples_json).is_file():
        samples = json.loads(Path(samples_json).read_text())
        out += (["### Samples", ""] if adapters else []) + [
            f"Greedy completions of held-out instructions (first 48 new tokens), by each run's model of {seed}"
            + ("; control characters are shown as escapes, `\\x1b` for ESC" if any(
                _printable(t) != t for x in samples for t in [x["instruction"], x["input"] or "", x["reference"],
                                                              *x["completions"].values()]) else "") + ":", ""]
        for i, s in enumerate(samples, 1):
            given = _printable(str(s["input"] or "").strip())
            block = "\n" in given or "\r" in given  # several lines: a code block below, else a code span
            out += [f"**{i}. {_text(s['instruction'])}**"
                    + ((" — input:" if block else f" — input: {_code_span(given)}") if given else ""), ""]
            # the block as written: only the blank lines around it left out (a strip took the first line's indent)
            lines = re.sub(r"^(?:[^\S\r\n]*(?:\r\n|\r|\n))+", "", str(s["input"])).rstrip() if block else ""
            out += [_code_block(_printable(lines)), ""] if block else []
            out += ["| model | completion |", "|:--|:--|",
                    f"| reference | {_cell(s['reference'])} |"]
            out += [f"| {name} | {_cell(text)} |" for name, text in s["completions"].items()]
            out.append("")
    return "\n".join(out) if len(out) > 2 else ""


def _printable(text: str) -> str:
    """``text`` with its control characters (C0 and C1, DEL; a generated sample can hold NUL or ESC, which make
    grep call the report binary and a terminal obey them) written as escapes, ``\\x1b``; tab, newline and
    carriage return kept."""
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and c not in "\t\n\r" else c
                   for c in str(text))


def _cell(text: str, limit: int = 160) -> str:
    """A sample as one Markdown table cell: runs of whitespace as one space (tab, newline, carriage return and
    the spaces; the control characters Python also counts as whitespace, such as \\x0b or \\x1f, are escaped),
    cut at ``limit`` characters, control characters escaped (:func:`_printable`), backticks and pipes made
    safe."""
    text = re.sub(r"[^\S\x0b\x0c\x1c-\x1f\x85]+", " ", str(text)).strip(" ")
    text = text if len(text) <= limit else text[:limit] + "…"
    return "`" + _printable(text).replace("`", "'").replace("|", "\\|") + "`" if text else "(empty)"


def _text(text: str) -> str:
    """``text`` (an instruction of the data) as Markdown that shows it as written, on one line: runs of whitespace as
    one space, the characters Markdown or HTML would read backslash-escaped (CodeAlpaca's "select all <p> tags" was
    HTML in summary.md, a ``[link](...)`` a link), control characters escaped (:func:`_printable`). A URL is text too:
    GitHub links a bare ``https://...`` or ``www....`` from its raw text, these escapes kept in it (``Machine\\_learning``
    shown and linked), so the ``:`` of ``://`` and the ``.`` of ``www.`` are escaped as well, which no link starts at."""
    text = re.sub(r"[^\S\x0b\x0c\x1c-\x1f\x85]+", " ", str(text)).strip(" ")
    text = re.sub(r"(?i)(www)\.", r"\1\\.", re.sub(r"([\\`*_\[\]<&~])", r"\\\1", text)).replace("://", "\\://")
    return _printable(text)


def _fence(text: str, least: int) -> str:
    """Backticks that open and close code holding ``text``: more than its longest run of them, at least ``least``."""
    return "`" * max(least, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))


def _code_span(text: str) -> str:
    """One line of ``text`` as an inline code span, shown as written (a backtick in it included)."""
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{_fence(text, 1)}{pad}{text}{pad}{_fence(text, 1)}"


def _code_block(text: str) -> str:
    """``text`` of several lines as a fenced code block, shown as written: in one code span a blank line in it ended
    the span, and its lines after became Markdown (a ``# comment`` a heading, ``---|---`` a table)."""
    return f"{_fence(text, 3)}\n{text}\n{_fence(text, 3)}"


def _config_arg(key, value) -> str:
    """One ``--config`` entry as Snakemake reads it back (``True`` / ``False`` for booleans, ``key=`` for None)."""
    if isinstance(value, (dict, list)):
        import yaml

        value = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}=" + ("" if value is None else str(value))


def rerun_section(ctx: dict | None = None, configfiles=(), snakefile: str = "", config_overrides=None) -> str:
    """Commands that rerun this experiment: with the config files it was run with (``--configfile`` last,
    since it and ``--resources`` take every value after them) and its ``--config`` values, its ``--snakefile``
    when snakemake would not find it in the working directory, and one of its runs as the example. Paths and
    values are quoted for the shell (a folder with a space)."""
    from shlex import quote

    cf = (f" --snakefile {quote(str(snakefile))}" if snakefile else "") + \
        ((" --config " + " ".join(quote(_config_arg(k, v)) for k, v in config_overrides.items()))
         if config_overrides else "") + \
        ((" --configfile " + " ".join(quote(str(f)) for f in configfiles)) if configfiles else "")
    per_seed = (ctx or {}).get("metrics_per_seed")
    example = "results/runs/lora-r128/seed42/metrics.json"
    if per_seed is not None and len(per_seed):
        runs = list(per_seed["run"])
        run = next((r for r in runs if r.startswith("lora-")), runs[0])
        # every seed's file, named: the first seed's alone retrains one replicate, and a shell's seed* also matches
        # the folder of a seed taken out of `seeds` since, which Snakemake would train again
        seeds = per_seed.loc[per_seed["run"] == run, "seed"].dropna() if "seed" in per_seed else []
        example = " ".join(f"results/runs/{run}/seed{seed}/metrics.json"
                           for seed in dict.fromkeys(int(s) for s in seeds) or [42])
    return "\n".join([
        "## How to rerun",
        "",
        "```bash",
        f"snakemake --cores 4 --resources gpu=1{cf}   # the whole sweep, up to date",
        f"snakemake --forcerun {example} --cores 4 --resources gpu=1{cf}   # retrain one run",
        f"snakemake reports/summary.md --cores 4 --resources gpu=1{cf}   # refresh this report",
        "```",
        "",
        "Targets come first: `--resources` and `--configfile` read every value after them. Each run's full "
        "provenance (resolved settings, package versions, hardware, commit, data fingerprint) is in "
        "`results/runs/<run>/seed<seed>/metrics.json` under `run_info`, `train_info` and `meta_info`.",
    ])


def _kernel_config():
    """The notebook kernel's channels encrypted (CurveZMQ) where pyzmq and the kernel support it, as ipykernel 7's
    do: in the clear, its loopback TCP could be read by other users of a shared machine, and the kernel warned of
    it in every logs/report.log ("Kernel is running over TCP without encryption")."""
    import zmq
    from traitlets.config import Config

    config = Config()
    if zmq.has("curve"):  # "auto": keys only for a kernel whose spec declares it supports them
        config.KernelManager.transport_encryption = "auto"
    return config


@contextlib.contextmanager
def _kernel_imports_this_lorasweep():
    """The notebook's kernel is a fresh Python: it imports lorasweep as its environment finds it, not from where the
    job rendering the report did. A Snakemake script job finds the workflow's checkout in the folders Snakemake
    appends to its ``sys.path`` (lorasweep not installed, or installed editable from another checkout), which the
    kernel does not get: it found no lorasweep (the report job failed at the notebook's first import) or the other
    checkout's. While the kernel starts, ``PYTHONPATH`` begins with the folder holding this package (left as it is for
    an installed copy, which the same interpreter finds in its site-packages)."""
    here = str(Path(__file__).resolve().parent.parent)
    before = os.environ.get("PYTHONPATH")
    if here not in map(os.path.realpath, site.getsitepackages()):
        os.environ["PYTHONPATH"] = os.pathsep.join([here, before]) if before else here
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def render_report(template, out_notebook, out_markdown, **parameters) -> Path:
    """Execute the notebook template with papermill, then export it to Markdown without code cells."""
    library_folders_in_workdir("IPYTHONDIR")  # here and in the kernel, where the home folder cannot be written
    import nbformat
    import papermill
    from nbconvert import MarkdownExporter

    out_markdown = Path(out_markdown)
    md_dir = out_markdown.parent.resolve()
    md_dir.mkdir(parents=True, exist_ok=True)
    def resolve(k, v):
        if k.endswith("_jsons"):
            return [str(Path(x).resolve()) for x in v]
        if k.endswith(("_csv", "summary", "_json")) and v:
            return str(Path(v).resolve())
        return v

    params = {k: resolve(k, v) for k, v in parameters.items()}
    params.setdefault("figures_dir", "figures")
    log.info("executing %s with papermill", template)
    with _kernel_imports_this_lorasweep():
        papermill.execute_notebook(str(template), str(out_notebook), parameters=params, cwd=str(md_dir),
                                   kernel_name="python3", progress_bar=False, log_output=False,
                                   config=_kernel_config())
    nb = nbformat.read(str(out_notebook), as_version=4)
    for cell in nb.cells:  # only what the sections display: no stream output, no warnings
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.get("output_type") in ("display_data", "execute_result")]
    exporter = MarkdownExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    body = re.sub(r"\n{3,}", "\n\n", body)  # nbconvert separates outputs with runs of blank lines
    with written_whole(out_markdown) as f:  # UTF-8 (its ±, −, →) whatever the locale; no part-written file left
        f.write(body.strip() + "\n")
    log.info("wrote %s", out_markdown)
    return out_markdown
