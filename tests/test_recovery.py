"""Nothing lost, nothing confusing: crashes resume, out-of-memory retries, same seed gives the same run."""

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from conftest import REPO, run_snakemake, snakemake_cmd
from lorasweep.config import run_spec
from lorasweep.train import ModelLoadError, TrainingOOM, batch_after_oom, load_model, record_oom, train_run

TINY = REPO / "config" / "tiny.yaml"


def _history(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _workdir(tmp_path, **training):
    """A workdir with an override file on top of the tiny preset (short runs, frequent checkpoints)."""
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"training": training}))
    # --configfile takes every file after it: targets go before the options
    return tmp_path, ("--cores", 2, "--resources", "gpu=1", "--configfile", TINY, override)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    workdir, args = _workdir(tmp_path, max_steps=150, checkpoint_steps=20, evals=3, logging_steps=5)
    run = workdir / "results" / "runs" / "full" / "seed0"
    target = "results/runs/full/seed0/metrics.json"
    proc = subprocess.Popen(snakemake_cmd(target, *args, workdir=workdir), cwd=workdir, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while not (run / "checkpoints" / "checkpoint-40" / "lorasweep_state.json").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the machine dies: snakemake and the training process at once
        proc.wait()
    assert not (run / "metrics.json").exists()  # nothing that looks finished

    # what a user does after a crash: release Snakemake's lock, rerun the incomplete job
    run_snakemake(target, "--unlock", *args, workdir=workdir)
    done = run_snakemake(target, "--rerun-incomplete", *args, workdir=workdir)
    log = (workdir / "logs" / "train" / "full" / "seed0.log").read_text()
    assert "resuming from checkpoint-" in log, done.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["train_segments"] == 2 and m["resumed_from_step"] >= 40 and m["resumed_from_step"] % 20 == 0
    assert m["train_steps"] == 150
    assert 0 < m["train_runtime_s"] <= m["train_wall_s"]

    # the loss curve is continuous: every logging step exactly once, tokens seen never go back
    history = _history(run / "log_history.jsonl")
    train_steps = [h["step"] for h in history if "loss" in h]
    assert train_steps == list(range(5, 151, 5))
    tokens = [h["tokens_nonpad_seen"] for h in history]
    assert tokens == sorted(tokens) and tokens[-1] == m["train_tokens_nonpad"]
    assert not (run / "checkpoints").exists()  # removed once the model is saved

    # and it is the run an uninterrupted one would have been
    cfg = yaml.safe_load(TINY.read_text())
    cfg["training"].update(max_steps=150, checkpoint_steps=0, evals=3, logging_steps=5)
    cfg["model"]["name_or_path"] = str(workdir / cfg["model"]["name_or_path"])
    from lorasweep.config import validate_config

    spec = run_spec(validate_config(cfg), "full")
    data = workdir / "results" / "data"
    ref = train_run(spec, data / "train.jsonl", data / "eval.jsonl", tmp_path / "reference", threads=2)
    assert (m["train_samples"], m["train_tokens_nonpad"]) == (ref["train_samples"], ref["train_tokens_nonpad"])
    ref_losses = [h["loss"] for h in _history(tmp_path / "reference" / "log_history.jsonl") if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-4)
    assert m["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_out_of_memory_is_retried_with_half_the_batch(tmp_path):
    workdir, args = _workdir(tmp_path, max_steps=6, evals=1, logging_steps=2)
    proc = run_snakemake("results/runs/lora-r8/seed0/metrics.json", *args, workdir=workdir,
                         env={"LORASWEEP_SIMULATE_OOM_ABOVE_BATCH": "4"})
    # the first attempt's reason is on the console; Snakemake retried the job once
    assert "out of memory at per-device batch 8 x accumulation 1" in proc.stdout + proc.stderr
    run = workdir / "results" / "runs" / "lora-r8" / "seed0"
    m = json.loads((run / "metrics.json").read_text())
    assert (m["batch_size"], m["grad_accum"], m["effective_batch"], m["oom_halvings"]) == (4, 2, 8, 1)
    assert m["train_samples"] == 6 * 8
    log = (workdir / "logs" / "train" / "lora-r8" / "seed0.log").read_text()  # the successful attempt's log
    assert "per-device batch 4 x accumulation 2 (effective batch kept)" in log
    assert not (run / "oom.json").exists()


def test_oom_halving_keeps_the_effective_batch(tmp_path):
    training = {"batch_size": 8, "grad_accum": 2}
    assert batch_after_oom(tmp_path, training) == (training, 0)
    err = record_oom(tmp_path, training, 0, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert isinstance(err, TrainingOOM) and "batch 4 x accumulation 4" in str(err)
    assert batch_after_oom(tmp_path, training) == ({"batch_size": 4, "grad_accum": 4}, 1)
    record_oom(tmp_path, {"batch_size": 4, "grad_accum": 4}, 1, RuntimeError("again"))
    record_oom(tmp_path, {"batch_size": 2, "grad_accum": 8}, 2, RuntimeError("again"))
    record_oom(tmp_path, {"batch_size": 1, "grad_accum": 16}, 3, RuntimeError("again"))
    with pytest.raises(TrainingOOM, match="out of memory even at per-device batch 1"):
        batch_after_oom(tmp_path, training)


def test_same_config_and_seed_give_identical_losses(tiny_config, tiny_data, tmp_path):
    spec = run_spec(tiny_config(max_steps=10, logging_steps=1), "lora-r8")
    runs = []
    for name in ("a", "b"):
        train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / name, threads=2)
        runs.append([(h["step"], h.get("loss"), h.get("eval_loss")) for h in _history(tmp_path / name / "log_history.jsonl")])
    assert len([r for r in runs[0] if r[1] is not None]) == 10
    assert runs[0] == runs[1]  # step by step, bit for bit


def test_a_directory_that_is_not_a_model_says_what_was_tried(tmp_path, tiny_config):
    spec = run_spec(tiny_config(), "full")
    spec["model"]["name_or_path"] = str(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model.name_or_path = .* read as a local directory"):
        load_model(spec, "cpu", "fp32")


def test_a_hub_id_offline_points_at_a_local_copy(tiny_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = run_spec(tiny_config(), "full")
    spec["model"]["name_or_path"] = "facebook/opt-350m-not-cached"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1") as e:
        load_model(spec, "cpu", "fp32")
    assert "local directory" in str(e.value)
