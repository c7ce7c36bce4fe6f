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


def _retrain(path) -> str:
    run, seed = run_and_seed(path)
    where = f"results/runs/{run}/seed{seed}" if seed is not None else f"results/runs/{run}"
    return f"retrain the run: snakemake ... --forcerun {where}/metrics.json"


def _json(path, text: str | None = None):
    """A JSON document (``text``, else ``path``'s), or an error naming the file a crash or a copy cut short."""
    try:
        return json.loads(Path(path).read_text() if text is None else text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not whole ({e}); {_retrain(path)}") from None


def check_history(path, records: list[dict], metrics: dict) -> None:
    """The log history a run's metrics were computed with: as many training logs as ``train_logs``, steps that only
    grow, and an evaluation at the last step. A file cut short, or written into by two processes, would draw loss
    curves that do not end where the tables say."""
    losses = [r["step"] for r in records if "loss" in r]
    evals = [r["step"] for r in records if "eval_loss" in r]
    problems = []
    if metrics.get("train_logs") is not None and len(losses) != metrics["train_logs"]:
        problems.append(f"{len(losses)} training logs where metrics.json counts {metrics['train_logs']}")
    for what, steps in (("training logs", losses), ("evaluations", evals)):
        if any(b <= a for a, b in zip(steps, steps[1:])):
            problems.append(f"its {what}' steps go back ({', '.join(map(str, steps[:12]))}, ...): two processes "
                            "wrote into it?")
    if metrics.get("train_steps") and (not evals or evals[-1] != metrics["train_steps"]):
        problems.append(f"its last evaluation is at step {evals[-1] if evals else None}, training ended at step "
                        f"{metrics['train_steps']}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems) + f"; {_retrain(path)}")


def collect(metrics_paths, history_paths, metrics_csv, history_csv, eval_loss_paths=(), eval_losses_csv=None
            ) -> pd.DataFrame:
    raw = {run_and_seed(p): _json(p) for p in metrics_paths}
    rows = [scalar_metrics(m) for m in raw.values()]
    df = pd.DataFrame(rows)
    df = df.iloc[sorted(range(len(df)), key=lambda i: (run_order(df["run"].iloc[i]), df["seed"].iloc[i]))
                 ].reset_index(drop=True)
    df.to_csv(metrics_csv, index=False)
    hist = []
    for p in history_paths:
        run, seed = run_and_seed(p)
        records = [_json(p, line) for line in Path(p).read_text().splitlines() if line.strip()]
        if (run, seed) in raw:
            check_history(p, records, raw[(run, seed)])
        hist += [{"run": run, "seed": seed, **r} for r in records]
    pd.DataFrame(hist).to_csv(history_csv, index=False)
    if eval_losses_csv is not None:
        rows = []
        for p in eval_loss_paths:
            data = _json(p)
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
