"""Findings computed from the metrics table: every sentence the report states about the runs comes from here.

Comparisons of eval loss are *paired*: every run is scored on the same held-out examples, so the
difference between two runs is estimated from per-example differences (``results/eval_losses.csv``),
with a 95% confidence interval. When the interval contains zero the report says the runs are not
distinguishable instead of ranking them. With one training seed the interval covers the sampling of
eval examples only; with replicate seeds (``seeds: [0, 1, 2]``) a run's figures are its means over seeds (its
perplexity that of the mean loss, its rates pooled: :func:`by_run`), ± the seeds' sample sd (n - 1), and
the interval also covers seed-to-seed variation: its half-width is
sqrt((t_n se_examples)^2 + (t se_seeds)^2), with t the 97.5% Student quantile for the seeds' degrees
of freedom (12.7 for two seeds: two seeds say little, and the interval says so) and t_n that for the n eval
examples' (n - 1; 2.02 for 40 examples, 1.96 for thousands).

Timings and memory are one measurement per run (the mean over seeds with replicates); differences
smaller than ``TIME_TOL`` and ``MEM_TOL`` (relative) are called "about the same", and on the CPU resident-memory
differences under ``RSS_NOISE_BYTES`` too (the measure's own rerun noise); larger ones inside the seeds' spread
are "not distinguishable from the seeds' spread".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .config import is_plain, parse_run, variant
from .provenance import MachineShare
from .scoring import perplexity

Z95 = 1.96
# 97.5% quantiles of Student's t for 1..30 degrees of freedom (beyond: Cornish-Fisher expansion, see t975)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    """Student's t 97.5% quantile: the table up to 30 degrees of freedom, beyond it the Cornish-Fisher expansion
    around the normal quantile (within 1e-4 from 31 on: 2.0227 at 39, 1.9623 at 999)."""
    if 1 <= dof <= len(T975):
        return T975[dof - 1]
    if dof < 1:
        return float("nan")
    z, v = Z95, float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


TIME_TOL = 0.05  # single timings of runs of minutes differ by a few percent; short runs more (report.short_runs_caveat)
MEM_TOL = 0.02
# The CPU's peak RSS of the same run, trained again with the same seed (bit-identical training), moved by up to
# 19.7 MiB on this project's 2-core machine (the tiny preset's full fine-tuning, 4 repeats; glibc's allocator, not
# training: benchmarks/rss_noise.py, benchmarks/results/cpu-rss-rerun-noise.json): resident-memory peaks closer
# than this are "about the same"
RSS_NOISE_BYTES = 24 * 2**20
BUSY_CPU_SHARE_PCT = MachineShare.BUSY_PCT  # other processes' CPU share above which timings are not comparable


# ---------------------------------------------------------------- helpers


def memory_measure(df: pd.DataFrame) -> tuple[str, str]:
    """The peak-memory column findings compare, and its name in prose. On the CPU, the peak RSS above the
    process's footprint before its model was loaded (``by_run`` derives it): the weights and what training
    added, without the Python and torch runtime that every run holds alike (~0.5 GiB), which in a total would
    hide real differences inside the comparisons' 2% tolerance."""
    if "peak_cuda_allocated_bytes" in df and df["peak_cuda_allocated_bytes"].notna().any():
        return "peak_cuda_allocated_bytes", "peak CUDA memory allocated"
    if "peak_rss_above_start_bytes" in df and df["peak_rss_above_start_bytes"].notna().all():
        return "peak_rss_above_start_bytes", "peak resident memory (RSS) above the process before its model loaded"
    return "peak_rss_bytes", "peak resident memory (RSS)"


def mem_tol(mem: str, base) -> float:
    """The tolerance, relative to ``base`` (the value another is compared against), under which peaks of the
    measure ``mem`` count as about the same: ``MEM_TOL``, and for a resident-memory (CPU) measure at least
    ``RSS_NOISE_BYTES`` of ``base`` (so a difference under that many bytes, whichever run is larger)."""
    if "rss" not in mem or base is None or pd.isna(base) or base <= 0:
        return MEM_TOL
    return max(MEM_TOL, RSS_NOISE_BYTES / base)


def mem_tol_text(mem: str) -> str:
    """``MEM_TOL`` in words: "2%", or "2% or 24 MiB" (``RSS_NOISE_BYTES``) for a resident-memory measure."""
    return f"{MEM_TOL:.0%}" + (f" or {mib(RSS_NOISE_BYTES)}" if "rss" in mem else "")


def mib(v: float) -> str:
    """Bytes in binary units, three significant figures: 512 KiB, 1.25 MiB, 3.10 GiB ("not measured": NaN)."""
    if v is None or pd.isna(v):
        return "not measured"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= size:
            return f"{v / size:.3g} {unit}"
    return f"{v:.0f} B"


def times(x: float) -> str:
    """A ratio as a multiplier: 16, 2, 1.5 (one decimal unless it is a whole number; "?" when not a number)."""
    if x is None or pd.isna(x) or math.isinf(x):
        return "?"
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def ratio_text(new: float, old: float, tol: float, more: str, less: str) -> str:
    """'12% slower' / 'about the same' style comparison of two single measurements."""
    if not old or any(map(lambda v: v is None or math.isnan(v), (new, old))):
        return "not measured"
    r = new / old - 1
    if abs(r) < tol:
        return f"about the same ({signed(r, '+.1%')})"
    if r >= 1:
        return f"{new / old:.1f}× {more}"
    return f"{abs(r):.0%} {more if r > 0 else less}"


def seeds_behind(r: pd.Series, col: str) -> int:
    """The seeds a run's figure in ``col`` is the mean of: ``<col>_n`` where some of its seeds lack the column
    (:func:`by_run`), else all its seeds."""
    n = r.get(f"{col}_n")
    return int(n) if n is not None and pd.notna(n) else int(r.get("n_seeds", 1) or 1)


def seed_tol(m: pd.DataFrame, col: str, a: str, b: str, tol: float) -> tuple[float, bool]:
    """``tol`` widened, where runs ``a`` and ``b`` (rows of ``m``, by run) both trained with replicate seeds, to the
    95% interval of the difference of their means (Student's t, the fewer seeds' degrees of freedom), relative to
    ``a``'s: a difference inside the seeds' own spread is no finding. Returns the tolerance and whether the
    spread widened it."""
    ra, rb = m.loc[a], m.loc[b]
    na, nb = seeds_behind(ra, col), seeds_behind(rb, col)
    sa, sb, base = ra.get(f"{col}_sd"), rb.get(f"{col}_sd"), ra.get(col)
    if min(na, nb) < 2 or any(v is None or pd.isna(v) for v in (sa, sb, base)) or not base:
        return tol, False
    rel = t975(min(na, nb) - 1) * math.sqrt(sa**2 / na + sb**2 / nb) / abs(base)
    return max(tol, rel), rel > tol


def spread_text(m: pd.DataFrame, col: str, b: str, a: str, tol: float, more: str, less: str,
                noise: str | None = None) -> str:
    """:func:`ratio_text` of run ``b`` against run ``a`` in column ``col`` with the tolerance ``tol`` (itself widened
    by the measure's ``noise``, when given, in words) and by the seeds' spread (:func:`seed_tol`). A difference
    beyond the measure's tolerance that only the seeds' spread covers is "not distinguishable from the seeds'
    spread (+718.1%)", not "about the same"; one inside the measure's noise says so."""
    new, old = m.loc[b, col], m.loc[a, col]
    eff, widened = seed_tol(m, col, a, b, tol)
    text = ratio_text(new, old, eff, more, less)
    base = MEM_TOL if noise else tol
    if text.startswith("about the same") and old and abs(new / old - 1) >= base:
        if widened and abs(new / old - 1) >= tol:  # beyond the measure's tolerance: only the seeds' spread covers it
            # not "about the same"
            return f"not distinguishable from the seeds' spread ({signed(new / old - 1, '+.1%')})"
        if noise:
            text = text[:-1] + f": within the measure's noise, {noise})"
    return text


def mem_text(m: pd.DataFrame, mem: str, b: str, a: str) -> str:
    """:func:`spread_text` for two runs' memory peaks of the measure ``mem``: within ``MEM_TOL``, the CPU measure's
    noise (``RSS_NOISE_BYTES``) or the seeds' spread, about the same."""
    tol = mem_tol(mem, m.loc[a, mem])
    return spread_text(m, mem, b, a, tol, "higher", "lower", noise=mib(RSS_NOISE_BYTES) if tol > MEM_TOL else None)


def time_text(m: pd.DataFrame, col: str, b: str, a: str, more: str, less: str) -> str:
    """:func:`spread_text` for two runs' timings (``TIME_TOL``, widened by the seeds' spread)."""
    return spread_text(m, col, b, a, TIME_TOL, more, less)


# a seed whose loss is not a number (a diverged run) makes the run's mean not a number: never averaged away
STRICT_MEAN = ("eval_loss", "eval_perplexity", "base_eval_loss", "train_loss", "train_loss_last")
# rates over train_runtime_s (a count over the runtime; MFU is tokens/s scaled): a run's is pooled over its seeds
RATES = ("train_samples_per_s", "train_steps_per_s", "train_tokens_nonpad_per_s", "mfu_pct")


def by_run(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the mean over training seeds of every numeric column, ``<column>_sd`` its sample standard
    deviation across seeds (n - 1; NaN with one seed), ``n_seeds`` and ``seeds``. Run order is kept; a table that
    is already one row per run is returned unchanged apart from those columns. The losses (``STRICT_MEAN``)
    of a run with a seed whose loss is NaN are NaN; other columns average the seeds that have a value, and where
    some run has a column in fewer of its seeds than it has (seeds trained by a lorasweep before that column),
    ``<column>_n`` counts them (:func:`pm` says so, :func:`seed_tol` uses it).

    Two columns are not plain means: ``eval_perplexity`` is exp of the mean eval loss, and the rates (``RATES``)
    are pooled: the seeds' summed counts over their summed ``train_runtime_s`` (the runtime-weighted mean of the
    seeds' rates), so that a rate is the rate of the mean runtime beside it (the mean of 56 and 3.5 steps/s
    would say 30 steps/s beside a mean runtime that takes 6.6); their ``_sd`` is still the sd of the seeds'
    own rates."""
    if "n_seeds" in df:
        return df
    if "seed" not in df:
        df = df.assign(seed=0)
    if {"peak_rss_bytes", "rss_before_load_bytes"} <= set(df.columns):  # memory_measure's CPU measure, per seed
        df = df.assign(peak_rss_above_start_bytes=df["peak_rss_bytes"] - df["rss_before_load_bytes"])
    g = df.groupby("run", sort=False)
    numeric = [c for c in df.select_dtypes("number").columns if c != "seed"]
    other = [c for c in df.columns if c not in numeric and c not in ("run", "seed")]
    sd = g[numeric].std(ddof=1).add_suffix("_sd")
    mean = g[numeric].mean()
    strict = [c for c in STRICT_MEAN if c in numeric]
    if strict:
        mean[strict] = mean[strict].mask(g[strict].agg(lambda s: s.isna().any()).astype(bool))
    if {"eval_perplexity", "eval_loss"} <= set(numeric):  # the perplexity of the loss shown beside it, exp(mean),
        mean["eval_perplexity"] = np.exp(mean["eval_loss"])  # not the mean of the seeds' perplexities
    if "train_runtime_s" in numeric:
        for c in [c for c in RATES if c in numeric]:
            both = df[c].notna() & df["train_runtime_s"].notna()
            runtime = df["train_runtime_s"].where(both)
            gr = (df[c] * runtime).groupby(df["run"], sort=False)
            pooled = gr.sum(min_count=1) / runtime.groupby(df["run"], sort=False).sum(min_count=1)
            several = both.groupby(df["run"], sort=False).sum() > 1  # one seed: its own rate, unchanged
            mean[c] = pooled.where(several, mean[c]).reindex(mean.index)
    seeds = g["seed"].apply(lambda s: ",".join(str(int(v)) for v in s)).rename("seeds")
    # a column some of a run's seeds lack (their metrics from a lorasweep before it): <column>_n, the seeds it is over;
    # not the losses, NaN where a seed's is (a seed that diverged), not a mean over the others
    count = g[[c for c in numeric if c not in strict]].count()
    partial = count.loc[:, ((count > 0) & count.lt(g.size(), axis=0)).any()].add_suffix("_n")
    # one concat, not a column at a time (pandas warns of a fragmented frame on wide metrics tables)
    out = pd.concat([*([g[other].first()] if other else []), mean, sd, g.size().rename("n_seeds"),
                     seeds, partial], axis=1).copy()
    return out.reset_index()[["run", *[c for c in df.columns if c not in ("run", "seed")], "seeds", "n_seeds",
                              *sd.columns, *partial.columns]]


def pm(r: pd.Series, col: str, fmt="{:.4f}") -> str:
    """'1.2345' for one seed, '1.2345 ± 0.0123' (the sample sd over seeds, n - 1) with replicates, '... (2 of 3
    seeds)' where the run's older seeds lack the column (``<column>_n``: :func:`by_run`). ``fmt``: a format
    string or a function of the value (``mib``)."""
    show = fmt if callable(fmt) else fmt.format
    v = show(r[col])
    sd = r.get(f"{col}_sd")
    v = v if sd is None or pd.isna(sd) else f"{v} ± {show(sd)}"
    n, of = r.get(f"{col}_n"), r.get("n_seeds")
    return v if n is None or pd.isna(n) or not n or n >= of else f"{v} ({int(n)} of {int(of)} seeds)"


def lora_runs(df: pd.DataFrame, method: str = "lora") -> list[tuple[int, str]]:
    """(rank, run) of the method's runs with PEFT's default options (variants like -olora left out)."""
    return sorted((parse_run(r)[1], r) for r in df["run"] if parse_run(r)[0] == method and is_plain(r))


def rank_series(df: pd.DataFrame, method: str = "lora") -> list[tuple[int, str]]:
    """(rank, run) of the method's runs whose ranks the sweep's findings compare: those with PEFT's default options
    (:func:`lora_runs`); in a sweep without them whose every run of the method has the same options (the method's
    ranks under a sweep-wide ``methods.lora.use_rslora``, ``use_dora`` or ``init``: lora-r8-rslora, lora-r32-rslora),
    those. The write-ups' claims are about plain LoRA and keep :func:`lora_runs`."""
    runs = [r for r in df["run"] if parse_run(r)[0] == method]
    plain = lora_runs(df, method)
    if plain or len({variant(r) for r in runs}) != 1:
        return plain
    return sorted((parse_run(r)[1], r) for r in runs)


class Losses:
    """Per-example eval losses of every run and seed (``results/eval_losses.csv``) for paired comparisons."""

    def __init__(self, table: pd.DataFrame | None):
        self.table = table if table is not None and len(table) else None
        if self.table is not None:
            self.table = self.table.assign(seed=self.table["seed"].fillna(0)) if "seed" in self.table else \
                self.table.assign(seed=0)

    def _rows(self, run: str) -> pd.DataFrame | None:
        if self.table is None:
            return None
        t = self.table[self.table["run"] == run]
        return t if len(t) else None

    @staticmethod
    def _per_seed(t: pd.DataFrame, which: str) -> pd.Series:
        """Token-weighted eval loss of each seed."""
        g = t.groupby("seed")
        return g[f"{which}_loss_sum"].sum() / g["tokens"].sum()

    def diff(self, a: str, b: str, which_a: str = "final", which_b: str = "final") -> dict | None:
        """Token-weighted eval loss of a minus b on the shared examples, with a 95% interval.

        D = sum_i (s_ai - s_bi) / sum_i n_i over examples i (s: loss summed over the example's response
        tokens, averaged over seeds; n: their count); its example-level standard error treats examples as the
        independent units (ratio estimator), so long and short examples are weighted as the loss itself weights
        them; the half-width takes Student's t for n - 1 degrees of freedom (a small eval split is not given
        the normal quantile's narrower interval). With replicate seeds, the seed-level standard error of the
        per-seed losses (paired by seed when a run is compared with its own untrained start) is added, with
        Student's t for the seeds' degrees of freedom.
        """
        ra, rb = self._rows(a), self._rows(b)
        if ra is None or rb is None:
            return None
        ta = ra.groupby("example")[["tokens", f"{which_a}_loss_sum"]].mean().set_axis(["tokens_a", "sum_a"], axis=1)
        tb = rb.groupby("example")[["tokens", f"{which_b}_loss_sum"]].mean().set_axis(["tokens_b", "sum_b"], axis=1)
        j = ta.join(tb, how="inner")
        j = j[j["tokens_a"] > 0]
        n = len(j)
        if n < 2:
            return None
        d = j["sum_a"] - j["sum_b"]
        tokens = j["tokens_a"]
        mean = d.sum() / tokens.sum()
        resid = d - mean * tokens
        se = math.sqrt(n / (n - 1) * (resid**2).sum()) / tokens.sum()
        half2 = (t975(n - 1) * se) ** 2  # n examples: Student's t, not the normal quantile (few eval examples)
        la, lb = self._per_seed(ra, which_a), self._per_seed(rb, which_b)
        if a == b:  # the same run's replicates before and after training: paired by seed
            ds = (la - lb).dropna()
            if len(ds) >= 2:
                half2 += (t975(len(ds) - 1) * ds.std(ddof=1) / math.sqrt(len(ds))) ** 2
        else:
            replicated = [x for x in (la, lb) if len(x) >= 2]
            if replicated:
                var = sum(x.var(ddof=1) / len(x) for x in replicated)
                half2 += t975(min(len(x) for x in replicated) - 1) ** 2 * var
        half = math.sqrt(half2)
        return {"diff": float(mean), "half": float(half), "n": n, "seeds": (len(la), len(lb)),
                "distinguishable": bool(abs(mean) > half)}


def ci_text(d: dict) -> str:
    """'95% CI over 40 examples' or '95% CI over 40 examples and 3 seeds each'."""
    ka, kb = d.get("seeds", (1, 1))
    seeds = "" if max(ka, kb) < 2 else (f" and {ka} seeds each" if ka == kb else f" and {ka} / {kb} seeds")
    return f"95% CI over {d['n']} examples{seeds}"


def _loss_change(losses: Losses, a: str, b: str, df: pd.DataFrame) -> tuple[str, bool | None]:
    """'eval loss 1.234 → 1.200 (−0.034 ± 0.010, distinguishable)' going from run a to run b."""
    m = df.set_index("run")
    d = losses.diff(b, a)
    head = f"eval loss {pm(m.loc[a], 'eval_loss')} → {pm(m.loc[b], 'eval_loss')}"
    if d is None:
        return head + " (no per-example losses: significance unknown)", None
    verdict = "a real difference" if d["distinguishable"] else "not distinguishable"
    return head + f" (Δ {signed(d['diff'], '+.4f')} ± {d['half']:.4f}, {ci_text(d)}: {verdict})", d["distinguishable"]


# ---------------------------------------------------------------- findings


def best_run(df: pd.DataFrame, losses: Losses) -> str:
    order = df.sort_values("eval_loss")["run"].tolist()
    best = order[0]
    ties = [r for r in order[1:] if (d := losses.diff(r, best)) is not None and not d["distinguishable"]]
    m = df.set_index("run")
    ev = m["eval_loss"]
    ppl = m["eval_perplexity"][best] if "eval_perplexity" in df else perplexity(ev[best])
    seeds = "n_seeds" in m and m["n_seeds"].max() > 1
    text = (f"**Lowest eval loss: `{best}`** ({pm(m.loc[best], 'eval_loss')}"
            + (", mean ± sd over seeds" if seeds else "") + f"; perplexity {ppl:.2f}"
            + (", that of the mean loss" if seeds else "") + ")")
    if ties:
        return text + (", but " + ", ".join(f"`{r}` ({pm(m.loc[r], 'eval_loss')})" for r in ties) +
                       (" is" if len(ties) == 1 else " are") + " not distinguishable from it "
                       "(95% paired interval contains zero): too close to call.")
    if len(order) > 1:
        second = order[1]
        d = losses.diff(second, best)
        if d is not None:
            return text + f"; the next best, `{second}` ({pm(m.loc[second], 'eval_loss')}), is higher by " \
                          f"{d['diff']:.4f} ± {d['half']:.4f} (95% paired interval)."
        return text + (f"; next: `{second}` ({pm(m.loc[second], 'eval_loss')}) (no per-example losses: significance "
                       "unknown).")
    return text + "."


def learning(df: pd.DataFrame, losses: Losses) -> str:
    parts, flat, worse = [], [], []
    for _, r in df.iterrows():
        d = losses.diff(r["run"], r["run"], "final", "base")
        gain = r["base_eval_loss"] - r["eval_loss"]
        change = round(-gain, 3) + 0.0  # no "-0.000" for a change that rounds to nothing
        parts.append(f"`{r['run']}` {r['base_eval_loss']:.3f} → {r['eval_loss']:.3f} ({signed(change, '+.3f')})")
        if d is not None and not d["distinguishable"]:
            flat.append(r["run"])
        elif d is not None and d["diff"] > 0:
            worse.append(r["run"])
    means = ", means over seeds" if "n_seeds" in df and df["n_seeds"].max() > 1 else ""
    text = (f"**Every run against its untrained starting point** (eval loss before → after{means}): "
            + "; ".join(parts) + ".")
    if flat:
        text += " No measurable improvement for " + ", ".join(f"`{r}`" for r in flat) + "."
    if worse:
        text += (" **Worse than untrained**: " + ", ".join(f"`{r}`" for r in worse) +
                 " (95% paired interval above zero): training made the model worse on held-out data; a learning "
                 "rate too high is the usual cause.")
    return text


def signed(v: float, spec: str) -> str:
    """``v`` formatted with ``spec`` (``'+.4f'``, ``'+.1%'``), a negative number with a minus sign (−), as the report
    writes its subtractions and ± spreads, not a hyphen: "(−2.524)", not "(-2.524)"."""
    return format(v, spec).replace("-", "−")


def _and(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def suspect_text(causes: dict[str, dict], runs) -> str:
    """Which of ``runs`` were timed under another load, each with its cause as recorded (``causes``:
    :func:`timing_causes`): "`a` and `b` timed on a busy machine, other processes taking up to 72% and 74% of the
    CPU respectively; `c` timed beside up to 3 other training jobs on its GPU". Runs with the same figure
    share it: "`a` and `b` each timed on a busy machine, other processes taking up to 72% of the CPU", not "up to
    72% and 72%". Empty when none was."""
    runs = list(dict.fromkeys(r for r in runs if r in causes))
    parts = []
    busy = [r for r in runs if "cpu" in causes[r]]
    if busy:
        shares = [f"{causes[r]['cpu']:.0f}%" for r in busy]
        same = len(busy) > 1 and len(set(shares)) == 1
        parts.append(f"{_and([f'`{r}`' for r in busy])} {'each ' if same else ''}timed on a busy machine, other "
                     f"processes taking up to {shares[0] if same else _and(shares)} of the CPU"
                     + (" respectively" if len(busy) > 1 and not same else ""))
    gpu = [r for r in runs if "gpu" in causes[r]]
    if gpu:
        jobs = [str(causes[r]["gpu"]) for r in gpu]
        same = len(gpu) > 1 and len(set(jobs)) == 1
        parts.append(f"{_and([f'`{r}`' for r in gpu])} {'each ' if same else ''}timed beside up to "
                     f"{jobs[0] if same else _and(jobs)} other training job(s) on "
                     + ("their GPU respectively" if len(gpu) > 1 and not same else "its GPU"))
    return "; ".join(parts)


def timing_caveat(suspect, runs) -> str:
    """What follows a timing comparison of ``runs`` when some were timed on a busy machine or beside other jobs on
    their GPU (``suspect``: :func:`timing_causes`), naming each one's cause."""
    text = suspect_text(suspect, runs)
    return f" (not comparable: {text})" if text else ""


def rank_steps(df: pd.DataFrame, losses: Losses, method: str = "lora", suspect: dict | None = None) -> list[str]:
    """What each step up in rank bought (loss) and cost (time, memory, parameters). ``suspect``: runs timed on
    a busy machine or a shared GPU, with the cause (:func:`timing_causes` of the per-seed table)."""
    runs = rank_series(df, method)
    if len(runs) < 2:
        return []
    options = f" ({variant(runs[0][1])})" if variant(runs[0][1]) else ""
    m = df.set_index("run")
    mem, mem_name = memory_measure(df)
    suspect = timing_causes(df) if suspect is None else suspect
    out, gains = [], []
    for (r1, a), (r2, b) in zip(runs, runs[1:]):
        loss_text, real = _loss_change(losses, a, b, df)
        caveat = timing_caveat(suspect, (a, b))
        d = losses.diff(b, a)
        gains.append((r1, r2, d["diff"] if d else m.loc[b, "eval_loss"] - m.loc[a, "eval_loss"], real,
                      d["half"] if d else None))
        out.append(
            f"**r={r1} → r={r2}**{options}: {loss_text}; train runtime "
            f"{time_text(m, 'train_runtime_s', b, a, 'longer', 'shorter')}, "
            f"tokens/s {time_text(m, 'train_tokens_nonpad_per_s', b, a, 'higher', 'lower')}{caveat}, "
            f"{mem_name} {mem_text(m, mem, b, a)} "
            f"({mib(m.loc[a, mem])} → {mib(m.loc[b, mem])}), trainable parameters "
            f"×{times(m.loc[b, 'trainable_params'] / m.loc[a, 'trainable_params'])}.")
    out.append(returns_verdict(gains))
    return out


def returns_verdict(gains: list[tuple[int, int, float, bool | None, float | None]]) -> str:
    """Diminishing returns or not, from the loss change of each rank step (negative = better): (rank from,
    rank to, change, whether its 95% interval excludes zero (None: unknown), the interval's half-width)."""
    if len(gains) == 1:
        r1, r2, d, real, _ = gains[0]
        if real is False:
            return f"Raising the rank from {r1} to {r2} made no measurable difference to eval loss."
        return f"Raising the rank from {r1} to {r2} changed eval loss by {signed(d, '+.4f')}."
    real = [g for g in gains if g[3]]
    if all(g[3] is False for g in gains):
        return "**Rank made no measurable difference** to eval loss over " + \
            ", ".join(str(g[0]) for g in gains) + f", {gains[-1][1]}."
    first, last = gains[0], gains[-1]
    if first[3] and first[2] < 0 and last[3] is False:
        return (f"**Diminishing returns**: r={first[0]} → {first[1]} lowered eval loss measurably "
                f"({signed(first[2], '+.4f')}), r={last[0]} → {last[1]} did not ({signed(last[2], '+.4f')}, "
                "within noise).")
    if first[3] and last[3]:
        if first[2] < 0 and last[2] < 0:
            doublings_first, doublings_last = math.log2(first[1] / first[0]), math.log2(last[1] / last[0])
            per_first, per_last = -first[2] / doublings_first, -last[2] / doublings_last  # the fall per doubling
            noise = first[4] / doublings_first + last[4] / doublings_last  # both intervals' half-widths
            kind = ("**Diminishing returns**" if per_first - per_last > noise else
                    "**No sign of diminishing returns**" if per_last - per_first > noise else
                    "**No measurable change in returns**")
            return (f"{kind}: per doubling of the rank, eval loss fell by {per_first:.4f} from r={first[0]} to "
                    f"{first[1]} and by {per_last:.4f} from r={last[0]} to {last[1]}"
                    + (" (the two differ by less than their 95% intervals together)"
                       if abs(per_first - per_last) <= noise else "") + ".")
        return ("Eval loss does not fall steadily with rank: " +
                ", ".join(f"r={g[0]} → {g[1]}: {signed(g[2], '+.4f')}" for g in gains) + ".")
    if real:
        return ("Only some rank steps changed eval loss measurably: " +
                ", ".join(f"r={g[0]} → {g[1]}: {signed(g[2], '+.4f')}"
                          + {True: "", False: " (within noise)", None: " (significance unknown)"}[g[3]]
                          for g in gains) + ".")
    return ("Rank steps: " + ", ".join(f"r={g[0]} → {g[1]}: {signed(g[2], '+.4f')}" for g in gains)
            + " (significance unknown).")


def quantization(df: pd.DataFrame, losses: Losses, suspect: dict | None = None) -> list[str]:
    """What 4-bit quantization saved and cost: qlora-rN against lora-rN, each QLoRA run against the LoRA run with its
    adapter settings (qlora-r8-rslora against lora-r8-rslora)."""
    m = df.set_index("run")
    mem, mem_name = memory_measure(df)
    suspect = timing_causes(df) if suspect is None else suspect
    out = []
    for q in [r for r in df["run"] if parse_run(r)[0] == "qlora"]:
        lo = q[1:]  # qlora-r8 -> lora-r8, qlora-r8-rslora -> lora-r8-rslora
        if lo not in m.index:
            out.append(f"`{q}` has no `{lo}` beside it, so quantization's effect cannot be isolated.")
            continue
        loss_text, _ = _loss_change(losses, lo, q, df)
        base_d = losses.diff(q, lo, "base", "base")
        base_text = (f"{m.loc[lo, 'base_eval_loss']:.4f} → {m.loc[q, 'base_eval_loss']:.4f}"
                     + (f" (Δ {signed(base_d['diff'], '+.4f')} ± {base_d['half']:.4f})" if base_d else ""))
        w_lo, w_q = m.loc[lo].get("predicted_weights_bytes"), m.loc[q].get("predicted_weights_bytes")
        weights = (f"; the weights it holds (base and adapter, predicted) shrink from {mib(w_lo)} to {mib(w_q)}, "
                   f"{w_q / w_lo:.0%} of `{lo}`'s"
                   if w_lo and w_q and not math.isnan(w_lo) else "")
        a_lo, a_q = m.loc[lo].get("predicted_activations_bytes"), m.loc[q].get("predicted_activations_bytes")
        autocast = m.loc[q].get("precision") in ("bf16", "fp16")
        if (weights and autocast and a_lo and a_q and not math.isnan(a_lo) and not math.isnan(a_q)
                and a_q > a_lo * (1 + MEM_TOL)):
            # bitsandbytes returns a 4-bit layer's output in its input's dtype: fp32 where autocast feeds it the fp32
            # output of a layer norm, so the activations after those layers are kept in fp32, not 16 bits (unless
            # training.frozen_weights_16bit feeds those layers 16 bits: lorasweep.train.feed_4bit_layers_16bit)
            weights += (f", while what autograd keeps for the backward pass (predicted) grows from {mib(a_lo)} to "
                        f"{mib(a_q)} (bitsandbytes returns each 4-bit layer's output in its input's dtype, fp32 after "
                        f"a layer norm under autocast, where a 16-bit layer's output stays in 16 bits; this run's "
                        f"were not fed 16 bits: `training.frozen_weights_16bit` off, DoRA, or a run from before "
                        f"lorasweep fed them)")
        out.append(
            f"**4-bit ({m.loc[q, 'quant_type']}) `{q}` vs `{lo}`**: {mem_name} "
            f"{mem_text(m, mem, q, lo)} "
            f"({mib(m.loc[lo, mem])} → {mib(m.loc[q, mem])}){weights}; train runtime "
            f"{time_text(m, 'train_runtime_s', q, lo, 'longer', 'shorter')}"
            f"{timing_caveat(suspect, (lo, q))}; "
            f"{loss_text}. Quantizing the untrained base moved its eval loss {base_text}.")
    return out


def full_finetuning(df: pd.DataFrame, losses: Losses, suspect: dict | None = None) -> list[str]:
    m = df.set_index("run")
    suspect = timing_causes(df) if suspect is None else suspect
    if "full" not in m.index:
        return []
    mem, mem_name = memory_measure(df)
    others = [r for r in m.index if r != "full"]
    if not others:
        return []
    best_adapter = min(others, key=lambda r: m.loc[r, "eval_loss"])
    loss_text, _ = _loss_change(losses, best_adapter, "full", df)
    out = [f"**Full fine-tuning** trains all {int(m.loc['full', 'trainable_params']):,} parameters; against the best "
           f"adapter run `{best_adapter}`: {loss_text}."]

    def listed(runs):
        return ", ".join(f"`{r}` {mib(m.loc[r, mem])}" for r in runs)

    def unmeasured(col):  # a value that is missing is compared with nothing, and said so
        return [r for r in others if pd.isna(m.loc[r, col])]

    no_mem = unmeasured(mem)
    measured = [r for r in others if r not in no_mem]
    spread = {r: seed_tol(m, mem, "full", r, mem_tol(mem, m.loc["full", mem])) for r in measured}
    tol = {r: t for r, (t, _) in spread.items()}
    widened = any(w for _, w in spread.values())
    tol_text = mem_tol_text(mem) + (" or the seeds' spread" if widened else "")
    same = "not distinguishable from" if widened else "about the same as"  # +18% is not "about the same"
    every = "any" if widened else "every"
    lighter = [r for r in measured if m.loc[r, mem] < m.loc["full", mem] * (1 - tol[r])]
    heavier = [r for r in measured if m.loc[r, mem] > m.loc["full", mem] * (1 + tol[r])]
    within = [r for r in measured if r not in lighter and r not in heavier]
    missing = f"not measured for {', '.join(f'`{r}`' for r in no_mem)}" if no_mem else ""
    if pd.isna(m.loc["full", mem]):
        mem_sentence = f"Its {mem_name} was not measured."
    elif not measured:
        mem_sentence = f"Its {mem_name} is {mib(m.loc['full', mem])}; no other run's was measured."
    else:
        mem_sentence = f"Its {mem_name} is {pm(m.loc['full'], mem, mib)}: "
        if not heavier and not lighter:
            mem_sentence += (f"{same} {every} other run{' measured' if no_mem else ''} "
                             f"(all within {tol_text})")
        elif heavier and not lighter and not within and not no_mem:
            mem_sentence += f"the **lowest** of all runs ({listed(heavier)})"
        elif lighter and not heavier and not within and not no_mem:
            mem_sentence += f"the highest; every adapter run needs less ({listed(lighter)})"
        else:  # no superlative when some run is within the tolerance of it, or was not measured
            mem_sentence += "; ".join(part for part in [
                f"higher than {listed(lighter)}" if lighter else "",
                f"lower than {listed(heavier)}" if heavier else "",
                f"{same} {listed(within)} (within {tol_text})" if within else ""] if part)
        mem_sentence += (f"; {missing}." if missing else ".")
    out.append(mem_sentence)
    no_time = unmeasured("train_runtime_s")
    time_spread = {r: seed_tol(m, "train_runtime_s", "full", r, TIME_TOL) for r in others if r not in no_time}
    faster = [r for r, (t, _) in time_spread.items()
              if m.loc[r, "train_runtime_s"] < m.loc["full", "train_runtime_s"] * (1 - t)]
    by_more = f"by more than {TIME_TOL:.0%}" + (" and the seeds' spread" if any(w for _, w in time_spread.values())
                                                 else "")
    if pd.isna(m.loc["full", "train_runtime_s"]):
        runtime = "Full fine-tuning's train runtime was not measured"
    else:
        seeds = "n_seeds" in m and m["n_seeds"].max() > 1
        runtime = (f"Full fine-tuning's train runtime is {pm(m.loc['full'], 'train_runtime_s', '{:.1f}')} s"
                   + (" (mean ± sd over seeds)" if seeds else "") + "; ")
        runtime += (f"faster than it ({by_more}): "
                    + ", ".join(f"`{r}` ({m.loc[r, 'train_runtime_s']:.1f} s)" for r in faster) if faster
                    else f"no adapter run trained faster ({by_more})")
        if no_time:
            runtime += "; not measured for " + ", ".join(f"`{r}`" for r in no_time)
    out.append(runtime + timing_caveat(suspect, m.index) + ".")
    return out


FAR_BELOW_BOUND = 0.25  # every run under this share of its bound's tokens/s: the GPU did not set the pace


def speed_bound(df: pd.DataFrame) -> list[str]:
    """On a known GPU: each run's tokens/s against the most its GPU allows at its tokens a step
    (:func:`lorasweep.speed.step_ceiling`), and what it means for the runtime comparisons when every run is far
    below its bound."""
    if "tokens_per_s_ceiling" not in df or df["tokens_per_s_ceiling"].isna().all():
        return []
    rows = df[df["tokens_per_s_ceiling"].notna()]
    share = rows["train_tokens_nonpad_per_s"] / rows["tokens_per_s_ceiling"]
    parts = [f"`{r['run']}` {r['train_tokens_nonpad_per_s']:,.0f} of {r['tokens_per_s_ceiling']:,.0f} tokens/s "
             f"({s:.0%}" + (f"; MFU {r['mfu_pct']:.1f}% of ≤ {r['mfu_ceiling_pct']:.0f}%)" if "mfu_pct" in r and
                             not pd.isna(r.get("mfu_pct")) else ")")
             for (_, r), s in zip(rows.iterrows(), share)]
    text = ("**Speed against what the GPU allows** at each run's tokens a step (model FLOPs at the GPU's peak plus "
            "the weights' memory traffic at its bandwidth, the results table's *MFU bound*): " + ", ".join(parts) + ".")
    if share.max() < FAR_BELOW_BOUND:
        text += (f" Every run stayed under {FAR_BELOW_BOUND:.0%} of its bound: neither the GPU's arithmetic nor its "
                 "memory set the pace, but per-step overhead (on the H100 and H200 of lorasweep's README, Speed, the "
                 "host issuing kernels). Runtime differences between the methods then follow the kernels each issues a "
                 "step more than the work each needs; a larger batch (`training.batch_size`) or several jobs per GPU "
                 "(`training.jobs_per_gpu`) use the GPU better.")
    return [text]


def _rows_above(df: pd.DataFrame, col: str, limit: float) -> pd.DataFrame | None:
    """The rows whose ``col`` exceeds ``limit`` (a missing value counts as 0); None when there are none."""
    rows = df[df[col].fillna(0) > limit] if col in df else df.iloc[:0]
    return None if rows.empty else rows


def _not_finite(v) -> bool:
    return v is None or pd.isna(v) or not math.isfinite(v)


def diverged(df: pd.DataFrame) -> tuple[str | None, list[str]]:
    """Runs whose training diverged, per run and seed: a finding (or None) and the runs to leave out of the
    comparisons (those whose eval loss is not a number: nothing can be compared with it). Runs that logged a
    non-finite loss or gradient norm but ended with a finite eval loss are named and still compared."""
    parts, excluded = [], []
    for _, r in df.iterrows():
        who = f"`{r['run']}`" + (f" (seed {int(r['seed'])})" if "seed" in df and df["run"].eq(r["run"]).sum() > 1
                                 else "")
        bad_logs = r.get("train_nonfinite_logs")
        logs = f"{int(bad_logs)} of {int(r['train_logs'])} training logs with a non-finite loss or gradient norm" \
            if not _not_finite(bad_logs) and bad_logs > 0 and not _not_finite(r.get("train_logs")) else None
        if _not_finite(r["eval_loss"]):
            excluded.append(r["run"])
            parts.append(f"{who}: eval loss {r['eval_loss']}" + (f", {logs}" if logs else ""))
        elif logs:
            parts.append(f"{who}: {logs}")
    if not parts:
        return None, []
    return ("**Training diverged**: " + "; ".join(parts) + ". A run whose eval loss is not a number is left out "
            "of every comparison below; the others are compared as measured, though their training was not "
            "stable (a non-finite gradient norm makes clipping zero the update). Lower the run's learning rate "
            "(`methods.<method>.learning_rate`) and retrain it (How to rerun, below)."), sorted(set(excluded))


def busy_machine(df: pd.DataFrame) -> str | None:
    """A warning when some runs trained while other processes took a share of the machine's CPU."""
    busy = _rows_above(df, "other_processes_cpu_share_pct", BUSY_CPU_SHARE_PCT)
    if busy is None:
        return None
    seeds = "seed" in busy and df.groupby("run")["seed"].nunique().max() > 1
    if len(busy) == len(df):
        advice = (". Every run trained under an unknown and changing load, so no runtime or throughput below "
                  "compares the methods, and the write-ups' timing claims are not checked; rerun the sweep on an "
                  "idle machine, one training job at a time (`--resources gpu=1`: without it, Snakemake trains "
                  "several runs at once when `--cores` allows), for timings that do.")
    else:
        advice = (". Their runtime and throughput are not comparable with the other runs, and no write-up timing "
                  "claim is checked with them; rerun them alone (`--forcerun results/runs/<run>/seed<seed>/"
                  "metrics.json`, with `--resources gpu=1` so that no other training job runs beside them) for "
                  "timings that are.")
    def clause(run, rows):  # one per run, its busy seeds named together (5 runs x 3 seeds: 5 clauses, not 15)
        share = rows["other_processes_cpu_share_pct"].max()
        if not seeds:
            return f"{share:.0f}% of the CPU while `{run}` trained"
        names = [str(int(s)) for s in rows["seed"]]
        return (("up to " if len(rows) > 1 else "") + f"{share:.0f}% of the CPU while `{run}` "
                f"(seed{'s' if len(rows) > 1 else ''} {_and(names)}) trained")

    return ("**Timings taken on a busy machine**: other processes used "
            + ", ".join(clause(run, rows) for run, rows in busy.groupby("run", sort=False)) + advice)


def timing_causes(df: pd.DataFrame) -> dict[str, dict]:
    """Runs (any seed) whose timings are not comparable, each with what its seeds recorded: ``cpu``, the largest
    share of the CPU other processes took (above ``BUSY_CPU_SHARE_PCT``: a busy machine), ``gpu``, the most other
    training jobs beside it on its GPU (``gpu_jobs_beside_max`` > 0). The findings name them
    (:func:`busy_machine`, :func:`shared_gpu`)."""
    out: dict[str, dict] = {}
    for col, limit, key, kind in (("other_processes_cpu_share_pct", BUSY_CPU_SHARE_PCT, "cpu", float),
                                  ("gpu_jobs_beside_max", 0, "gpu", int)):
        rows = _rows_above(df, col, limit)
        if rows is not None:
            for run, v in rows.groupby("run", sort=False)[col].max().items():
                out.setdefault(run, {})[key] = kind(v)
    return out


def _labeller(df: pd.DataFrame, rows: pd.DataFrame):
    """A row's name in a note: `run`, with its seed where the table holds several seeds of a run."""
    seeds = "seed" in rows and df.groupby("run")["seed"].nunique().max() > 1
    return lambda r: f"`{r['run']}`" + (f" (seed {int(r['seed'])})" if seeds else "")


def resumed(df: pd.DataFrame) -> str | None:
    """A note on the runs resumed from a checkpoint after a crash or a kill (``train_segments`` > 1)."""
    rows = _rows_above(df, "train_segments", 1)
    if rows is None:
        return None
    label = _labeller(df, rows)

    def name(r):
        start = r.get("resumed_from_step")
        return (label(r) + f": {int(r['train_segments'])} segments"
                + (f", the last from step {int(start)}" if start is not None and pd.notna(start) else ""))

    return ("**Runs resumed after a crash or a kill**: " + "; ".join(name(r) for _, r in rows.iterrows()) +
            ". A resumed run trains the steps and losses of an uninterrupted one (tested on the CPU); its runtime "
            "sums its segments, so it counts each segment's start-up (first steps, any compilation) and not the "
            "work lost after its last checkpoint, and its memory peaks are the highest of several processes, each "
            "taken above its own footprint at load.")


def shared_gpu(df: pd.DataFrame) -> str | None:
    """A warning when runs trained beside other training jobs on their GPU (``training.jobs_per_gpu`` > 1)."""
    shared = _rows_above(df, "gpu_jobs_beside_max", 0)
    if shared is None:
        return None
    name = _labeller(df, shared)
    if len(shared) == len(df) > 1:
        who = (f"every run, each beside up to {int(shared['gpu_jobs_beside_max'].max())} other training job(s) "
               "at a time")
    else:
        who = ", ".join(f"{name(r)} beside up to {int(r['gpu_jobs_beside_max'])} other training job(s)"
                        for _, r in shared.iterrows())
    return ("**Runs that shared their GPU**: " + who +
            ". Their runtime, tokens/s and MFU are lower than each would reach alone (on an H200, four jobs at "
            "once ran 8-20% slower each); their losses and memory peaks are their own. Set "
            "`training.jobs_per_gpu: 1` for timings comparable with a run alone.")


def findings(df: pd.DataFrame, eval_losses: pd.DataFrame | None = None) -> list[str]:
    """All findings, in reading order; each entry is one Markdown paragraph or bullet."""
    losses = Losses(eval_losses)
    # per run and seed, before seeds are averaged (a table already averaged has lost what these look for)
    shared, busy, suspect, resumes = shared_gpu(df), busy_machine(df), timing_causes(df), resumed(df)
    unstable, excluded = diverged(df)
    df = by_run(df[~df["run"].isin(excluded)])
    out = [w for w in [unstable, busy, shared, resumes] if w]
    if df.empty:
        return out
    out += [best_run(df, losses), learning(df, losses)]
    out += rank_steps(df, losses, "lora", suspect)
    out += quantization(df, losses, suspect)
    out += full_finetuning(df, losses, suspect)
    out += speed_bound(df)
    return out


# ---------------------------------------------------------------- the write-ups' claims, checked


def _falls(values: list[float]) -> bool:
    """Every value below the one before."""
    return all(b < a for a, b in zip(values, values[1:]))


def _lowest(values: pd.Series, run: str, others: list[str], tol, tol_text: str | None = None) -> str:
    """Is ``run``'s value below every other's by more than the tolerance (relative; ``tol``: a number, or a
    function of (base run, other run) giving it relative to the base's value; ``tol_text``: it in words)?"""
    of = tol if callable(tol) else (lambda base, other: tol)
    missing = [r for r in [run, *others] if pd.isna(values[r])]
    if missing:
        return "cannot check (not measured: " + ", ".join(f"`{r}`" for r in missing) + ")"
    if all(values[run] < values[r] * (1 - of(r, run)) for r in others):
        return "agrees"
    if any(values[r] < values[run] * (1 - of(run, r)) for r in others):
        return "disagrees"
    return f"too close to call (within {tol_text or ('' if callable(tol) else f'{tol:.0%}')})"


def _rises(values: list[float], tol, tol_text: str | None = None, falls: bool = False) -> str:
    """'agrees' if every step rises (``falls``: falls) beyond its tolerance, 'disagrees' if any goes the other way
    beyond it (only the opposite, measured, refutes a claim), 'partly' if some go the claimed way beyond it and
    the rest stay within, else too close to call (every step within it, whichever way it goes). ``tol``: one
    relative tolerance, or one per step (relative to the step's first value)."""
    steps = list(zip(values, values[1:]))
    tols = list(tol) if isinstance(tol, (list, tuple)) else [tol] * len(steps)
    if any(pd.isna(v) for v in values):
        return "cannot check (not measured for every run)"
    up = [b > a * (1 + t) for (a, b), t in zip(steps, tols)]
    down = [b < a * (1 - t) for (a, b), t in zip(steps, tols)]
    claimed, opposite = (down, up) if falls else (up, down)
    if all(claimed):
        return "agrees"
    if any(opposite):
        return "disagrees"
    if not tol_text and not any(tols):  # no tolerance (one seed, a loss): a step neither up nor down is equal
        return "disagrees: no step changes it" if not any(claimed) else "partly: some steps change nothing"
    text = tol_text or f"{tols[0]:.0%}"
    if not any(claimed):
        return f"too close to call (every step within {text})"
    return f"partly: some steps within {text}"


def pair_tols(m: pd.DataFrame, col: str, pairs, base_tol, base_text: str) -> tuple[dict, str]:
    """Per pair of runs ``(a, b)``: the tolerance relative to ``a``'s value under which ``b``'s counts as about the
    same: ``base_tol(a)``, widened by that pair's seed spread (:func:`seed_tol`); and the tolerance in words."""
    got = {(a, b): seed_tol(m, col, a, b, base_tol(a)) for a, b in pairs}
    return ({k: t for k, (t, _) in got.items()},
            base_text + (" or the seeds' spread" if any(w for _, w in got.values()) else ""))


def _pair_tol_of(m: pd.DataFrame, col: str, run: str, others: list[str], base_tol, base_text: str):
    """:func:`_lowest`'s tolerance for ``run`` against each of ``others`` both ways (:func:`pair_tols`), as a
    function of (base run, other run), and its text."""
    pairs = [(run, r) for r in others] + [(r, run) for r in others]
    tols, text = pair_tols(m, col, pairs, base_tol, base_text)
    return (lambda base, other: tols[(base, other)]), text


# the write-ups' train-loss claims, each checked on our figure of the kind it reported: (source, column, name)
TRAIN_LOSS_CLAIMS = (("W2", "train_loss_last", "last logged train loss"),
                     ("W3", "train_loss", "train loss (mean over the run)"))


def _loss_tols(m: pd.DataFrame, col: str, pairs) -> tuple[dict, bool]:
    """Per pair of runs, the relative tolerance of a train-loss difference: the 95% interval of the difference of
    their seed means (:func:`seed_tol` from zero; there are no per-example train losses to pair), and whether
    every run had replicate seeds to measure it (with one seed a difference is taken as measured)."""
    tols = {(a, b): seed_tol(m, col, a, b, 0.0)[0] for a, b in pairs}
    runs = {r for pair in pairs for r in pair}
    replicated = "n_seeds" in m and all(int(m.loc[r, "n_seeds"] or 1) >= 2 for r in runs)
    return tols, replicated


def note_text(replicated: bool) -> str:
    """How a train-loss claim's differences were judged (:func:`_loss_tols`)."""
    return (" (differences inside the seeds' spread, the 95% interval of the difference of two runs' means, count "
            "as equal)" if replicated else
            " (one seed: no spread to judge a difference by; differences taken as measured)")


def writeup_claims(df: pd.DataFrame, eval_losses: pd.DataFrame | None = None) -> list[dict]:
    """Each published claim, and whether this sweep's measurements agree (agrees / disagrees / cannot check)."""
    losses = Losses(eval_losses)
    suspect = timing_causes(df)  # per seed, before averaging
    df = by_run(df[~df["run"].isin(diverged(df)[1])])  # no claim rests on a run whose eval loss is not a number
    m = df.set_index("run")

    def timing(verdict: str, runs) -> str:
        busy = suspect_text(suspect, runs)
        return f"cannot check ({busy})" if busy else verdict
    mem, mem_name = memory_measure(df)
    ranks = lora_runs(df)
    lo = [r for _, r in ranks]
    claims = []

    def add(source, claim, verdict, evidence):
        claims.append({"source": source, "claim": claim, "ours": verdict, "evidence": evidence})

    if "full" in m.index and lo:
        targets = ", ".join(dict.fromkeys(f"`{t}`" for t in m.loc[lo].get("target_modules", pd.Series(dtype=object))
                                          .dropna())) or "unrecorded modules"
        best_lora = min(lo, key=lambda r: m.loc[r, "eval_loss"])
        d = losses.diff("full", best_lora)
        if d is None:
            verdict = "agrees" if m.loc["full", "eval_loss"] < m.loc[best_lora, "eval_loss"] else "disagrees"
        elif not d["distinguishable"]:
            verdict = "too close to call"
        else:
            verdict = "agrees" if d["diff"] < 0 else "disagrees"
        # W1 trained plain LoRA ranks: its claim is checked against the best of those, not a variant (-olora, -dora)
        variants = [r for r in m.index if parse_run(r)[0] == "lora" and not is_plain(r)]
        add("W1", "full fine-tuning reached the lowest eval loss", verdict,
            f"full {m.loc['full', 'eval_loss']:.4f} vs `{best_lora}` {m.loc[best_lora, 'eval_loss']:.4f}, the best of "
            f"W1's LoRA ranks" + (" (variants excluded: " + ", ".join(f"`{r}`" for r in variants) + ")"
                                  if variants else "")
            + (f" (Δ {signed(d['diff'], '+.4f')} ± {d['half']:.4f})" if d else ""))
        # W1 ran full fine-tuning and LoRA only: a QLoRA run or an adapter variant is not part of its claim
        add("W1", "full fine-tuning used the least peak memory",
            _lowest(m[mem], "full", lo, *_pair_tol_of(m, mem, "full", lo, lambda a: mem_tol(mem, m.loc[a, mem]),
                                                      mem_tol_text(mem))),
            f"{mem_name}: full {mib(m.loc['full', mem])}; " +
            ", ".join(f"{r} {mib(m.loc[r, mem])}" for r in lo) + f"; W1's LoRA adapted every linear layer, ours "
            f"{targets}")
        # the author's explanation of W1's LoRA memory: one sweep's LoRA runs share their target modules
        add("W1", "adapting every linear layer (all-linear) is what raised LoRA's memory above full fine-tuning's",
            "cannot check (this sweep's LoRA runs all adapt the same modules; a second sweep with "
            "`methods.lora.target_modules: all-linear` beside this one can)", f"our LoRA runs adapt {targets}")
        slower = [r for r in lo if parse_run(r)[1] in (128, 256)]
        if slower:
            add("W1", "full fine-tuning was faster than LoRA " + " and ".join(
                f"r={parse_run(r)[1]}" for r in slower) + (" (W1: r=128 and r=256)" if len(slower) < 2 else ""),
                timing(_lowest(m["train_runtime_s"], "full", slower,
                               *_pair_tol_of(m, "train_runtime_s", "full", slower, lambda a: TIME_TOL,
                                             f"{TIME_TOL:.0%}")), ["full", *slower]),
                f"runtime s: full {m.loc['full', 'train_runtime_s']:.1f}; " +
                ", ".join(f"{r} {m.loc[r, 'train_runtime_s']:.1f}" for r in slower))
    if len(lo) >= 2:
        ev = [m.loc[r, "eval_loss"] for r in lo]
        steps = [losses.diff(b, a) for a, b in zip(lo, lo[1:])]
        if all(s is not None for s in steps):
            if all(s["distinguishable"] and s["diff"] < 0 for s in steps):
                verdict = "agrees"
            elif any(s["distinguishable"] and s["diff"] > 0 for s in steps):
                verdict = "disagrees"
            else:
                verdict = "too close to call"
        else:
            verdict = "agrees" if _falls(ev) else "disagrees"
        add("W1", "a higher LoRA rank gives a (slightly) lower loss (W1 charted train and eval loss; checked on "
            "eval loss)", verdict, "eval loss " + ", ".join(f"r={r} {m.loc[n, 'eval_loss']:.4f}" for r, n in ranks))
        # W2 and W3 reported train loss only: checked on ours, the same kind of figure each gave
        for source, col, what in TRAIN_LOSS_CLAIMS:
            if col not in m:
                continue
            pairs = list(zip(lo, lo[1:]))
            tols, note = _loss_tols(m, col, pairs)
            add(source, f"a higher LoRA rank gives a lower {what}",
                _rises([m.loc[r, col] for r in lo], [tols[p] for p in pairs], note and "the seeds' spread",
                       falls=True),
                f"{what} " + ", ".join(f"r={r} {pm(m.loc[n], col)}" for r, n in ranks) + note_text(note))
        rt = [m.loc[r, "train_runtime_s"] for r in lo]
        pairs = list(zip(lo, lo[1:]))
        tols, tol_text = pair_tols(m, "train_runtime_s", pairs, lambda a: TIME_TOL, f"{TIME_TOL:.0%}")
        add("W1, W2, W3", "training gets slower as the rank grows",
            timing(_rises(rt, [tols[p] for p in pairs], tol_text), lo),
            "runtime s " + ", ".join(f"r={r} {m.loc[n, 'train_runtime_s']:.1f}" for r, n in ranks)
            + f" (differences under {tol_text} count as equal)")
        mm = [m.loc[r, mem] for r in lo]
        tols, tol_text = pair_tols(m, mem, pairs, lambda a: mem_tol(mem, m.loc[a, mem]), mem_tol_text(mem))
        add("W2, W3", "peak memory rises with the rank", _rises(mm, [tols[p] for p in pairs], tol_text),
            f"{mem_name} " + ", ".join(f"r={r} {mib(m.loc[n, mem])}" for r, n in ranks)
            + f" (differences under {tol_text} count as equal)")
    r128, r256 = "lora-r128", "lora-r256"
    if r128 in m.index and r256 in m.index:
        for source, col, what in TRAIN_LOSS_CLAIMS:
            if col not in m:
                continue
            tols, note = _loss_tols(m, col, [(r128, r256)])
            diff = m.loc[r256, col] - m.loc[r128, col]
            gain = -diff  # how much lower r=256's loss is than r=128's
            before = m.loc[lo[0], col] - m.loc[r128, col]  # the gain up to r=128
            if any(pd.isna(v) for v in (gain, before)):
                verdict = "cannot check (not measured for every run)"
            elif abs(diff) <= tols[(r128, r256)] * abs(m.loc[r128, col]):
                verdict = "agrees (no measurable gain)"
            elif gain < 0:
                # "measurably": beyond the seeds' spread; with one seed there is none to measure it by
                verdict = f"agrees (r=256 {'measurably worse' if note else 'worse'})"
            elif lo[0] == r128:  # "little" needs the gain from a lower rank up to r=128 to compare with
                verdict = "cannot check (a measurable gain, and no rank below 128 to call it little against)"
            else:  # a measurable gain: "little" next to the gain up to r=128
                verdict = "agrees" if before > 0 and gain < 0.25 * before else "disagrees"
            add(source, f"little gain from r=128 to r=256 in {what} (diminishing returns)", verdict,
                f"{what} " + ", ".join(f"r={r} {pm(m.loc[n], col)}" for r, n in ranks if r <= 128 or n == r256)
                + f" (r=128 → 256: {signed(diff, '+.4f')})" + note_text(note))
    return claims


def tradeoffs(df: pd.DataFrame) -> list[str]:
    """LoRA's trade-offs against full fine-tuning, in this sweep's numbers (``df``: per run and seed)."""
    suspect = timing_causes(df)  # per seed, before averaging
    df = by_run(df[~df["run"].isin(diverged(df)[1])])  # a run whose eval loss is not a number trades nothing
    m = df.set_index("run")
    if "full" not in m.index:
        return []
    mem, mem_name = memory_measure(df)
    f = m.loc["full"]
    out = []
    for run in [r for r in m.index if r != "full"]:
        r = m.loc[run]
        out.append(
            f"`{run}`: trains {int(r['trainable_params']):,} parameters, "
            f"{100 * r['trainable_params'] / f['trainable_params']:.3g}% as many as full fine-tuning; its saved "
            f"adapter is {mib(r['saved_model_bytes'])} against full fine-tuning's {mib(f['saved_model_bytes'])} model "
            f"({r['saved_model_bytes'] / f['saved_model_bytes']:.1%}). Against full fine-tuning: {mem_name} "
            f"{mem_text(m, mem, run, 'full')}, train runtime "
            f"{time_text(m, 'train_runtime_s', run, 'full', 'longer', 'shorter')}"
            f"{timing_caveat(suspect, ('full', run))}, eval loss {pm(r, 'eval_loss')} vs {pm(f, 'eval_loss')} "
            f"({signed(r['eval_loss'] - f['eval_loss'], '+.4f')}).")
    return out
