"""Training jobs that start together: how long each spends preparing (tokenizing) the same splits.

    python benchmarks/concurrent_prep.py --data ../shared/data/codealpaca/code_alpaca_2k.json --repeat 10 \
        [--runs full lora-r8 lora-r128] [--json OUT.json]

A sweep starts several training jobs at once when they share a GPU (`training.jobs_per_gpu`) or when there
are several GPUs; each job builds its trainer, where TRL tokenizes the training and eval splits into
`datasets`' cache. This prepares the data (``--repeat`` times over: 10 gives CodeAlpaca-20k's size), builds
the tiny model on it, starts one training job per ``--runs`` at the same moment (one step each, one thread,
on the CPU) and reports, per job, the seconds spent preparing the splits, the seconds spent waiting for
another job doing so, and whether it tokenized; and the wall clock until all have finished. Run it with
``PYTHONPATH`` pointing at another checkout to measure that code the same way (one that records no wait or
tokenization shows them as absent).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = """
import json, sys
from lorasweep.config import operational, run_spec, validate_config
from lorasweep.train import train_run
cfg = validate_config(json.loads(sys.argv[1]))
train_run(run_spec(cfg, sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], threads=1, operational=operational(cfg))
"""

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CodeAlpaca-format .json")
    ap.add_argument("--repeat", type=int, default=10, help="the records this many times over")
    ap.add_argument("--runs", nargs="+", default=["full", "lora-r8", "lora-r128"])
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    from lorasweep.data import prepare
    from lorasweep.tiny import build_tiny_model_from_jsonl

    work = Path(tempfile.mkdtemp(prefix="concurrent_prep-"))
    records = json.loads(Path(a.data).read_text())
    (work / "data.json").write_text(json.dumps(records * a.repeat))
    d = work / "data"
    prepare(work / "data.json", d / "train.jsonl", d / "eval.jsonl", d / "summary.json", eval_size=0.05, seed=0)
    model = build_tiny_model_from_jsonl(d / "train.jsonl", work / "model")
    ranks = sorted({int(r.split("-r")[1]) for r in a.runs if "-r" in r}) or [8]
    cfg = {"model": {"name_or_path": str(model)}, "dataset": {"source": str(work / "data.json")},
           "methods": {"lora": {"ranks": ranks}, "qlora": {"ranks": ranks}},
           "training": {"device": "cpu", "max_steps": 1, "batch_size": 4, "max_length": a.max_length, "evals": 1,
                        "eval_batch_size": 64}, "seed": 0}
    print(f"{len(records) * a.repeat:,} records; starting {len(a.runs)} training jobs together", flush=True)
    t0 = time.perf_counter()
    procs = {run: subprocess.Popen([sys.executable, "-c", JOB, json.dumps(cfg), run, str(d / "train.jsonl"),
                                    str(d / "eval.jsonl"), str(work / run)], stderr=subprocess.PIPE, text=True,
                                   cwd=work)  # not the checkout: PYTHONPATH picks the code
             for run in a.runs}
    for run, p in procs.items():
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"{run} failed:\n{err[-2000:]}")
    wall = time.perf_counter() - t0
    jobs = {}
    for run in a.runs:
        info = json.loads((work / run / "metrics.json").read_text())["train_info"]
        jobs[run] = {k: info.get(k) for k in ("data_prep_s", "data_prep_wait_s", "data_tokenized")}
        print(f"  {run:<10} preparing {info['data_prep_s']:6.2f} s  waiting {info.get('data_prep_wait_s') or 0:6.2f} s"
              f"  tokenized: {info.get('data_tokenized', 'not recorded')}")
    prep_sum = sum(j["data_prep_s"] for j in jobs.values())
    print(f"all {len(a.runs)} done in {wall:.1f} s; preparing the splits took {prep_sum:.1f} s of the jobs in all")
    if a.json:
        import importlib.util

        import lorasweep

        # this checkout's helper, not the package's: PYTHONPATH may point at an older checkout that has none
        spec = importlib.util.spec_from_file_location("_provenance", REPO / "lorasweep" / "provenance.py")
        provenance = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(provenance)
        Path(a.json).write_text(json.dumps({
            "records": len(records) * a.repeat, "runs": a.runs, "max_length": a.max_length, "wall_s": wall,
            "data_prep_s_sum": prep_sum, "jobs": jobs, "lorasweep": str(Path(lorasweep.__file__).parent),
            "cpus": __import__("os").cpu_count(), "provenance": provenance.benchmark_provenance(__file__)}, indent=1))


if __name__ == "__main__":
    main()
