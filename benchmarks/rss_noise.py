"""How much does the CPU's peak-memory figure move when the same run is trained again? The report's noise floor.

    python benchmarks/rss_noise.py --repeats 4 --runs full lora-r8 lora-r128 lora-r256 qlora-r8 --json out.json

Trains each run of the tiny preset (``config/tiny.yaml``: its generated data and model, built here in a
temporary folder as its rules build them) ``--repeats`` times, each in a fresh process as a workflow job is,
with the same settings and seed (so the same losses, to the bit), and prints per run the figure the report
compares on the CPU: the peak resident memory above the process before its model loaded
(``peak_rss_bytes - rss_before_load_bytes``). What moves between repeats is not training (identical) but
the process: glibc's allocator, which keeps some freed blocks and returns others, and thread start-up.
The report calls two runs' CPU memory "about the same" under ``lorasweep.findings.RSS_NOISE_BYTES``, set
from this benchmark's largest range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def _config(work: Path) -> dict:
    from lorasweep.config import validate_config

    cfg = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    cfg["model"] = {"name_or_path": str(work / "model"), "build_tiny": None}  # built below, loaded as a directory
    cfg["dataset"]["source"] = str(work / "tiny.json")
    return validate_config(cfg)


def _child(work: Path, run: str, threads: int) -> None:
    from lorasweep.config import operational, run_spec
    from lorasweep.train import train_run

    cfg = _config(work)
    with tempfile.TemporaryDirectory() as out:
        m = train_run(run_spec(cfg, run), work / "train.jsonl", work / "eval.jsonl", out, threads=threads,
                      operational={**operational(cfg), "checkpoint_steps": 0})
    print(json.dumps({k: m.get(k) for k in ("peak_rss_bytes", "rss_before_load_bytes", "rss_at_load_bytes",
                                            "eval_loss", "train_loss", "train_runtime_s")}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", nargs=2, metavar=("WORK", "RUN"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(Path(a.child[0]), a.child[1], a.threads)
        return {}

    from lorasweep import data, tiny

    per_run: dict[str, list[dict]] = {r: [] for r in a.runs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg_text = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
        tiny.write_tiny_dataset(work / "tiny.json")
        d = cfg_text["dataset"]
        data.prepare(str(work / "tiny.json"), work / "train.jsonl", work / "eval.jsonl", work / "summary.json",
                     eval_size=d["eval_size"], seed=cfg_text["seed"])
        from lorasweep.config import validate_config

        shape = validate_config(cfg_text)["model"]["build_tiny"]  # with the schema's defaults, as the rule builds it
        tiny.build_tiny_model_from_jsonl(work / "train.jsonl", work / "model", seed=cfg_text["seed"], **shape)
        for i in range(a.repeats):  # runs interleaved: a drift of the machine spreads over all of them alike
            for run in a.runs:
                proc = subprocess.run([sys.executable, __file__, "--child", str(work), run, "--threads",
                                       str(a.threads)], capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["above_before_load_mib"] = (r["peak_rss_bytes"] - r["rss_before_load_bytes"]) / 2**20
                per_run[run].append(r)
                print(f"repeat {i + 1}/{a.repeats} {run:10s}: {r['above_before_load_mib']:6.1f} MiB above the "
                      f"process before its model loaded (eval loss {r['eval_loss']:.6f})", flush=True)
    summary = {}
    for run, rows in per_run.items():
        v = [r["above_before_load_mib"] for r in rows]
        summary[run] = {"mib": v, "mean": statistics.mean(v), "range": max(v) - min(v),
                        "sd": statistics.stdev(v) if len(v) > 1 else None,
                        "same_eval_loss": len({r["eval_loss"] for r in rows}) == 1}
    widest = max(s["range"] for s in summary.values())
    print("\npeak RSS above the process before its model loaded, per run over "
          f"{a.repeats} repeats (MiB): mean, range, sd; training itself identical in every repeat")
    for run, s in summary.items():
        sd = f"{s['sd']:.1f}" if s["sd"] is not None else "-"
        print(f"  {run:10s}: {s['mean']:6.1f}  range {s['range']:5.1f}  sd {sd:>5s}  "
              f"same eval loss in every repeat: {s['same_eval_loss']}")
    print(f"  widest range: {widest:.1f} MiB")
    out = {"runs": summary, "widest_range_mib": widest, "repeats": a.repeats, "threads": a.threads,
           "per_repeat": per_run}
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, out, __file__, argv)
    return out


if __name__ == "__main__":
    main()
