"""Does lorasweep's training step scale linearly with data? Tokens/s across ``dataset.fraction``.

    python benchmarks/scaling.py --data ../shared/data/codealpaca/code_alpaca_2k.json --fractions 0.25 0.5 1.0

For each fraction the data is prepared as the workflow prepares it (same seed: the same eval split, a
growing share of the rest for training), and lorasweep's training step runs one epoch on it. Work linear
in data means tokens/s stays flat as the fraction grows (a per-step cost that grew with the dataset,
such as re-tokenizing or re-shuffling everything, would show as falling throughput). Also printed: the
seconds TRL's dataset preparation took in each run (tokenization is cached per prepared split, see
``lorasweep.data.load_splits``), and for the largest fraction a second run on the same split, which
loads the tokenization from the cache.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lorasweep.data import prepare
from lorasweep.logs import console_progress
from lorasweep.speed import train_single_run


def one_epoch(model: str, train: Path, evals: Path, out: Path, *, run: str, batch: int, lr: float, max_length: int,
              device: str, seed: int) -> dict:
    m = train_single_run(model, train, evals, out, run, lr=lr, device=device, seed=seed, epochs=1, batch_size=batch,
                         max_length=max_length)
    return {"train_examples": m["train_info"]["train_examples"], "steps": m["train_steps"],
            "tokens": m["train_tokens_nonpad"], "seconds": m["train_runtime_s"],
            "tokens_per_s": m["train_tokens_nonpad_per_s"], "data_prep_s": m["train_info"]["data_prep_s"],
            "hardware": m["hardware"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CodeAlpaca-format .json/.jsonl/.parquet (or hub id)")
    ap.add_argument("--model", help="model path or hub id; default: build the tiny OPT on the data")
    ap.add_argument("--run", default="full", help="full or lora-r<rank>")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    console_progress()  # lorasweep's step and evaluation lines on stderr while it trains

    work = Path(tempfile.mkdtemp(prefix="lorasweep-scaling-"))
    model = a.model
    if model is None:  # one tokenizer for every fraction: built on the full training split
        from lorasweep.tiny import build_tiny_model_from_jsonl

        full = work / "full"
        full.mkdir()
        prepare(a.data, full / "train.jsonl", full / "eval.jsonl", full / "summary.json", eval_size=0.05, seed=a.seed)
        model = str(build_tiny_model_from_jsonl(full / "train.jsonl", work / "opt-tiny"))
    common = dict(run=a.run, batch=a.batch, lr=a.lr, max_length=a.max_length, device=a.device, seed=a.seed)
    rows = []
    for f in sorted(a.fractions):
        d = work / f"fraction-{f}"
        d.mkdir()
        prepare(a.data, d / "train.jsonl", d / "eval.jsonl", d / "summary.json", eval_size=0.05, fraction=f,
                seed=a.seed)
        r = {"fraction": f, **one_epoch(model, d / "train.jsonl", d / "eval.jsonl", d / "run", **common)}
        rows.append(r)
        print(f"fraction {f:5.2f}: {r['train_examples']:6,} examples, {r['steps']:5,} steps, {r['tokens']:>10,} tokens "
              f"in {r['seconds']:7.2f} s = {r['tokens_per_s']:>9,.0f} tokens/s; data preparation {r['data_prep_s']:.2f} s",
              flush=True)
    d = work / f"fraction-{rows[-1]['fraction']}"
    again = one_epoch(model, d / "train.jsonl", d / "eval.jsonl", d / "run-again", **common)
    print(f"same split again: data preparation {again['data_prep_s']:.2f} s (cached tokenization), "
          f"{again['tokens_per_s']:,.0f} tokens/s")
    lo, hi = rows[0]["tokens_per_s"], rows[-1]["tokens_per_s"]
    print(f"tokens/s at fraction {rows[-1]['fraction']} vs {rows[0]['fraction']}: {hi / lo:.2f}x "
          "(1.00x = work linear in data)")
    out = {"run": a.run, "data": a.data, "model": a.model or "tiny OPT (built on the data)", "batch": a.batch,
           "max_length": a.max_length, "device": a.device, "hardware": rows[0]["hardware"], "fractions": rows,
           "rerun_on_largest": again, "tokens_per_s_ratio_largest_vs_smallest": hi / lo}
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, out, __file__, argv, a.device)
    return out


if __name__ == "__main__":
    main()
