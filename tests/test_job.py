"""python -m lorasweep.job: one job of the workflow run in the foreground, outside Snakemake, as Snakemake runs it."""

import json
import os
import shutil
import subprocess
import sys

import yaml

from conftest import REPO, run_snakemake

TINY = REPO / "config" / "tiny.yaml"


def run_job(target, *args, workdir):
    """``python -m lorasweep.job <target> ...`` in ``workdir`` on this repo's Snakefile."""
    return subprocess.run([sys.executable, "-m", "lorasweep.job", target, "--snakefile", str(REPO / "Snakefile"),
                           *map(str, args)], cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_training_job_run_outside_snakemake_trains_the_same_and_snakemake_trusts_it(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"training": {"max_steps": 6, "evals": 2, "logging_steps": 2}}))
    args = ("--cores", 2, "--configfile", TINY, override)
    target = "results/runs/lora-r8/seed0/metrics.json"
    run = tmp_path / "results" / "runs" / "lora-r8" / "seed0"
    run_snakemake(target, *args, "--resources", "gpu=1", workdir=tmp_path)  # data, tiny model, the one run
    by_snakemake = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    for name in ("metrics.json", "log_history.jsonl", "eval_losses.json", "model"):
        shutil.rmtree(run / name) if name == "model" else (run / name).unlink()

    proc = run_job(target, *args, workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rule train (run=lora-r8, seed=0), threads 2, log logs/train/lora-r8/seed0.log" in proc.stderr
    ours = json.loads((run / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "trainable_params", "train_steps"):
        assert ours[key] == by_snakemake[key], key
    assert ours["hardware"] == by_snakemake["hardware"] and "2 threads" in ours["hardware"]
    ours_history = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    assert [h.get("loss") for h in ours_history] == [h.get("loss") for h in history]
    assert (run / "model").is_dir() and (tmp_path / "logs" / "train" / "lora-r8" / "seed0.log").is_file()
    # recorded as Snakemake's own job: nothing to redo for the target
    dry = run_snakemake(target, "-n", *args, workdir=tmp_path)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]


def test_a_target_no_rule_makes_is_named_in_the_error(tmp_path):
    proc = run_job("results/runs/lora-r9/seed0/metrics.json", "--configfile", TINY, workdir=tmp_path)
    assert proc.returncode != 0
    assert "lorasweep.job: results/runs/lora-r9/seed0/metrics.json:" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_a_failed_job_whose_output_was_missing_leaves_no_partial_output_for_snakemake_to_trust(tmp_path):
    """A job run this way that fails after writing part of an output it did not have before: the output is deleted,
    as Snakemake deletes a failed job's, and the next ``snakemake`` plans the job (the DAG's cache of what existed,
    still read afterwards, said the output was missing: it was kept, and ``snakemake -n`` found nothing to do)."""
    target = "results/tiny/code_alpaca_tiny.json"
    failing = (  # the tiny_dataset script, failing after a partial write
        "import sys\n"
        "import lorasweep.tiny, lorasweep.job\n"
        "def write(path):\n"
        "    open(path, 'w').write('[')\n"
        "    raise RuntimeError('disk full')\n"
        "lorasweep.tiny.write_tiny_dataset = write\n"
        "lorasweep.job.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", failing, target, "--snakefile", str(REPO / "Snakefile"),
                           "--configfile", str(TINY), "--cores", "1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "RuntimeError: disk full" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / target).exists(), proc.stderr[-3000:]
    dry = run_snakemake(target, "-n", "--configfile", TINY, workdir=tmp_path)
    assert "Nothing to be done" not in dry.stdout + dry.stderr and "tiny_dataset" in dry.stdout + dry.stderr


def test_a_job_with_a_benchmark_and_none_written_yet_succeeds_and_is_trusted(tmp_path):
    """A rule with a ``benchmark:`` (prepare_data, train, ...) run this way before any benchmark file exists (a job
    that never succeeded under Snakemake, the case one debugs): this writes no benchmark, and Snakemake's output
    check asked for it (MissingOutputException after a successful script)."""
    for target in ("results/tiny/code_alpaca_tiny.json", "results/data/train.jsonl"):
        proc = run_job(target, "--configfile", TINY, "--cores", 1, workdir=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "results" / "benchmarks" / "prepare_data.tsv").exists()
    dry = run_snakemake("results/data/train.jsonl", "-n", "--configfile", TINY, workdir=tmp_path)
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]


def test_a_job_terminated_outside_snakemake_leaves_no_incomplete_marker(tmp_path):
    """``kill`` (SIGTERM) of a job run this way: its outputs are deleted and Snakemake's record cleared, as Snakemake
    does on SIGTERM, so the next ``snakemake`` reruns the job (Python's default SIGTERM ended the process at once and
    left the output marked incomplete: the next run stopped with IncompleteFilesException)."""
    import signal
    import time

    target = "results/tiny/code_alpaca_tiny.json"
    slow = (  # the tiny_dataset script, stopped after a first partial write
        "import sys, time\n"
        "import lorasweep.tiny, lorasweep.job\n"
        "def write(path):\n"
        "    open(path, 'w').write('[')\n"
        "    open('started', 'w').close()\n"
        "    time.sleep(120)\n"
        "lorasweep.tiny.write_tiny_dataset = write\n"
        "lorasweep.job.main(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, target, "--snakefile", str(REPO / "Snakefile"),
                             "--configfile", str(TINY), "--cores", "1"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / "started").exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert not (tmp_path / target).exists(), err[-3000:]
    dry = run_snakemake(target, "-n", "--configfile", TINY, workdir=tmp_path, check=False)
    assert "IncompleteFilesException" not in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]
    assert dry.returncode == 0 and "tiny_dataset" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]


def test_a_folder_output_job_run_after_its_input_changed_is_trusted(tmp_path):
    """A job with a ``benchmark:`` and a folder output, rerun this way because an input folder changed (merge after
    its adapter was retrained): the next ``snakemake`` does not plan it again, and its output is not left marked
    incomplete. Snakemake dates a job's outputs by the oldest of them and its benchmark, which this does not write:
    the old benchmark, kept, was older than the changed input (a folder has no content checksum to excuse it), and
    the next ``snakemake -n`` planned merge again."""
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"training": {"max_steps": 2, "evals": 1, "logging_steps": 1}}))
    args = ("--cores", 1, "--configfile", TINY, override)
    target = "results/runs/lora-r8/seed0/merged"
    run = tmp_path / "results" / "runs" / "lora-r8" / "seed0"
    run_snakemake(target, *args, "--resources", "gpu=1", workdir=tmp_path)  # data, tiny model, the run, its merge
    (run / "model" / ".snakemake_timestamp").touch()  # the adapter changed since the merge
    dry = run_snakemake(target, "-n", *args, workdir=tmp_path)
    assert "Updated input files: results/runs/lora-r8/seed0/model" in dry.stdout + dry.stderr, dry.stdout[-3000:]

    proc = run_job(target, *args, workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "merged" / "model.safetensors").is_file() and (run / "merged" / ".snakemake_timestamp").is_file()
    dry = run_snakemake(target, "-n", *args, workdir=tmp_path)
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]
    assert not any((tmp_path / ".snakemake" / "incomplete").iterdir())
