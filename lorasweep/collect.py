"""Gather every run's metrics.json and log_history.jsonl into two tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from .config import parse_run

log = logging.getLogger(__name__)


def scalar_metrics(metrics: dict) -> dict:
    """The top-level scalar fields of a metrics.json (nested provenance dicts stay in the JSON)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def run_order(run: str) -> tuple:
    method, rank = parse_run(run)
    return ({"full": 0, "lora": 1, "qlora": 2}[method], rank or 0)


def collect(metrics_paths, history_paths, metrics_csv, history_csv, eval_loss_paths=(), eval_losses_csv=None
            ) -> pd.DataFrame:
    rows = [scalar_metrics(json.loads(Path(p).read_text())) for p in metrics_paths]
    df = pd.DataFrame(rows)
    df = df.iloc[sorted(range(len(df)), key=lambda i: run_order(df["run"].iloc[i]))].reset_index(drop=True)
    df.to_csv(metrics_csv, index=False)
    hist = []
    for p in history_paths:
        run = Path(p).parent.name
        for line in Path(p).read_text().splitlines():
            if line.strip():
                hist.append({"run": run, **json.loads(line)})
    pd.DataFrame(hist).to_csv(history_csv, index=False)
    if eval_losses_csv is not None:
        rows = []
        for p in eval_loss_paths:
            data = json.loads(Path(p).read_text())
            for i, (b, f) in enumerate(zip(data["base"], data["final"])):
                rows.append({"run": Path(p).parent.name, "example": i, "tokens": f["tokens"],
                             "base_loss_sum": b["loss_sum"], "final_loss_sum": f["loss_sum"]})
        pd.DataFrame(rows, columns=["run", "example", "tokens", "base_loss_sum", "final_loss_sum"]).to_csv(
            eval_losses_csv, index=False)
    log.info("collected %d runs into %s", len(df), metrics_csv)
    return df
