"""Gather every run's metrics.json and log_history.jsonl into two tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from .config import is_plain, parse_run

log = logging.getLogger(__name__)


def scalar_metrics(metrics: dict) -> dict:
    """The top-level scalar fields of a metrics.json (nested provenance dicts stay in the JSON)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def run_order(run: str) -> tuple:
    """full, then LoRA by rank (PEFT's default options first, then variants), then QLoRA."""
    method, rank = parse_run(run)
    return ({"full": 0, "lora": 1, "qlora": 2}[method], rank or 0, not is_plain(run), run)


def run_and_seed(path) -> tuple[str, int | None]:
    """``results/runs/<run>/seed<seed>/<file>`` -> (run, seed); ``results/runs/<run>/<file>`` -> (run, None)."""
    parent = Path(path).parent
    if parent.name.startswith("seed") and parent.name[4:].isdigit():
        return parent.parent.name, int(parent.name[4:])
    return parent.name, None


def collect(metrics_paths, history_paths, metrics_csv, history_csv, eval_loss_paths=(), eval_losses_csv=None
            ) -> pd.DataFrame:
    rows = [scalar_metrics(json.loads(Path(p).read_text())) for p in metrics_paths]
    df = pd.DataFrame(rows)
    df = df.iloc[sorted(range(len(df)), key=lambda i: (run_order(df["run"].iloc[i]), df["seed"].iloc[i]))
                 ].reset_index(drop=True)
    df.to_csv(metrics_csv, index=False)
    hist = []
    for p in history_paths:
        run, seed = run_and_seed(p)
        for line in Path(p).read_text().splitlines():
            if line.strip():
                hist.append({"run": run, "seed": seed, **json.loads(line)})
    pd.DataFrame(hist).to_csv(history_csv, index=False)
    if eval_losses_csv is not None:
        rows = []
        for p in eval_loss_paths:
            data = json.loads(Path(p).read_text())
            run, seed = run_and_seed(p)
            if len(data["base"]) != len(data["final"]):  # each run scores the whole eval split before and after
                raise ValueError(f"{p}: {len(data['base'])} untrained and {len(data['final'])} trained per-example "
                                 "losses; the paired comparisons need both for every eval example (retrain this run)")
            for i, (b, f) in enumerate(zip(data["base"], data["final"])):
                rows.append({"run": run, "seed": seed, "example": i, "tokens": f["tokens"],
                             "base_loss_sum": b["loss_sum"], "final_loss_sum": f["loss_sum"]})
        pd.DataFrame(rows, columns=["run", "seed", "example", "tokens", "base_loss_sum", "final_loss_sum"]).to_csv(
            eval_losses_csv, index=False)
    log.info("collected %d runs x seeds into %s", len(df), metrics_csv)
    return df
