"""Nothing lost, nothing confusing: crashes resume, out-of-memory retries, same seed gives the same run."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_snakemake, snakemake_cmd
from lorasweep.config import run_spec
from lorasweep.resume import TrainingOOM, batch_after_oom, find_resumable, halve_batch, record_oom, retry_may_help
from lorasweep.train import ModelLoadError, load_model, train_run

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
    # the killed attempt's log, which Snakemake deleted before the rerun, under its second name
    [killed] = (workdir / "logs" / "train" / "full").glob("seed0.log.*-unfinished")
    assert "step 40/150" in killed.read_text() and "resuming from" not in killed.read_text()
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
    cfg["model"].update(name_or_path=str(workdir / cfg["model"]["name_or_path"]), build_tiny=None)  # built: load it
    from lorasweep.config import validate_config

    spec = run_spec(validate_config(cfg), "full")
    data = workdir / "results" / "data"
    ref = train_run(spec, data / "train.jsonl", data / "eval.jsonl", tmp_path / "reference", threads=2)
    assert (m["train_samples"], m["train_tokens_nonpad"]) == (ref["train_samples"], ref["train_tokens_nonpad"])
    ref_losses = [h["loss"] for h in _history(tmp_path / "reference" / "log_history.jsonl") if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-4)
    assert m["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-4)
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)  # over all 150 steps, both segments


@pytest.mark.slow
def test_a_preempted_training_job_saves_its_step_and_snakemakes_retry_resumes_it(tmp_path):
    """A cluster preempts the training job (SIGTERM to its process, as SLURM does before SIGKILL): the job saves a
    checkpoint at the end of its step and fails; Snakemake's retry resumes from it and the workflow succeeds.
    The stopped attempt's log is kept beside the retry's."""
    workdir, args = _workdir(tmp_path, max_steps=60, checkpoint_steps=1000, evals=2, logging_steps=5)
    log_path = workdir / "logs" / "train" / "lora-r8" / "seed0.log"
    target = "results/runs/lora-r8/seed0/metrics.json"
    proc = subprocess.Popen(snakemake_cmd(target, *args, workdir=workdir), cwd=workdir, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    try:
        while not (log_path.exists() and "step 10/60" in log_path.read_text()):
            assert proc.poll() is None, "the run ended before it could be stopped"
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)
        found = subprocess.run(["pgrep", "-f", f"{workdir}/.snakemake/scripts/.*train.py"], capture_output=True,
                               text=True).stdout.split()
        assert len(found) == 1, found
        os.kill(int(found[0]), signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    m = json.loads((workdir / "results" / "runs" / "lora-r8" / "seed0" / "metrics.json").read_text())
    assert m["train_segments"] == 2 and 10 <= m["resumed_from_step"] < 60 and m["train_steps"] == 60
    stopped = [p.read_text() for p in log_path.parent.glob("seed0.log.*-failed")]
    assert len(stopped) == 1 and f"stopped by SIGTERM at step {m['resumed_from_step']} of 60" in stopped[0]
    assert f"resuming from checkpoint-{m['resumed_from_step']}" in log_path.read_text()


@pytest.mark.slow
def test_out_of_memory_is_retried_with_half_the_batch_and_other_errors_are_not(tmp_path):
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
    # Snakemake deleted the first attempt's log before retrying; its copy keeps the traceback
    [kept] = (workdir / "logs" / "train" / "lora-r8").glob("seed0.log.*-failed")
    first = kept.read_text()
    assert "OutOfMemoryError" in first and "simulated: CUDA out of memory" in first
    assert not (run / "oom.json").exists()

    # an error that no retry changes: Snakemake's two retries stop at once, quoting the first attempt's error
    cuda = workdir / "cuda.yaml"
    cuda.write_text(yaml.safe_dump({"training": {"device": "cuda"}}))
    target = "results/runs/lora-r128/seed0/metrics.json"
    proc = run_snakemake(target, *args, cuda, workdir=workdir, check=False)
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert console.count("lorasweep: NoGPUError: training.device is 'cuda'") == 1, console[-4000:]
    assert console.count("lorasweep: RepeatedFailure: attempt 1 of this job failed with NoGPUError") == 2
    assert "attempt 3 stops here" in console
    failed = workdir / "results" / "runs" / "lora-r128" / "seed0" / "failed.json"
    assert json.loads(failed.read_text())["attempt"] == 3
    # three attempts within a second or two: each kept its own copy of its log, the first's traceback included
    kept = sorted((workdir / "logs" / "train" / "lora-r128").glob("seed0.log.*-failed"))
    assert len(kept) == 3 and sum("raise NoGPUError(" in k.read_text() for k in kept) == 1
    # fixed, the next snakemake run starts afresh (its attempt 1) and trains; success leaves no record
    run_snakemake(target, *args, workdir=workdir)
    assert not failed.exists()
    assert json.loads(failed.with_name("metrics.json").read_text())["train_steps"] == 6


def test_only_errors_a_retry_can_change_are_retried(tmp_path):
    """Snakemake retries a failed training job twice: for out-of-memory errors (halved batch), network and CUDA
    faults. Anything else stops the retry before it loads a model; a crash that left no record is resumed."""
    import torch

    from lorasweep.config import ConfigError
    from lorasweep.resume import EvalOOM, RepeatedFailure, record_failure, refuse_repeated_failure, retry_may_help
    from lorasweep.train import NoGPUError

    def caused(error, cause):
        try:
            raise error from cause
        except type(error) as e:
            return e

    assert retry_may_help(TrainingOOM("out of memory at per-device batch 8"))
    assert retry_may_help(torch.OutOfMemoryError("CUDA out of memory"))
    assert retry_may_help(caused(ModelLoadError("could not load the model"), ConnectionError("hub unreachable")))
    assert retry_may_help(RuntimeError("CUDA error: unspecified launch failure"))
    assert not retry_may_help(caused(EvalOOM("while evaluating"), torch.OutOfMemoryError("CUDA out of memory")))
    assert not retry_may_help(caused(ModelLoadError("could not load"), FileNotFoundError("no config.json")))
    assert not retry_may_help(ConfigError("training.precision"))
    assert not retry_may_help(NoGPUError("no CUDA GPU"))
    # out of memory at a batch that cannot be halved again, a kernel's assert, the hub switched off: no retry helps
    one = {"batch_size": 1, "grad_accum": 8}
    assert not retry_may_help(record_oom(tmp_path, one, 0, torch.OutOfMemoryError("CUDA out of memory")))
    (tmp_path / "oom.json").unlink()
    assert not retry_may_help(RuntimeError("CUDA error: device-side assert triggered"))
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert not retry_may_help(caused(ModelLoadError("could not load"), OfflineModeIsEnabled("HF_HUB_OFFLINE=1")))

    refuse_repeated_failure(tmp_path, 2)  # a retry after a crash (no record): trains
    record_failure(tmp_path, 1, NoGPUError("no CUDA GPU is visible"))
    with pytest.raises(RepeatedFailure, match="attempt 1 of this job failed with NoGPUError: no CUDA GPU is visible"):
        refuse_repeated_failure(tmp_path, 2)
    refuse_repeated_failure(tmp_path, 3)  # the record is attempt 1's, not attempt 2's: attempt 2 crashed
    record_failure(tmp_path, 1, TrainingOOM("out of memory"))
    refuse_repeated_failure(tmp_path, 2)  # the retry halves the batch
    record_failure(tmp_path, 1, ConfigError("bad key"))
    refuse_repeated_failure(tmp_path, 1)  # a new snakemake run: the old record is gone
    assert not (tmp_path / "failed.json").exists()
    refuse_repeated_failure(tmp_path, 2)


def _train_and_die_saving_the_model(monkeypatch, cfg, spec, train, evals, out):
    """Train a run that is killed while it saves its trained model: its periodic checkpoints stay behind."""
    from lorasweep import train as T
    from lorasweep.config import operational

    saved = T.save_trained

    def crash(*a, **k):
        raise RuntimeError("killed while saving the model")

    monkeypatch.setattr(T, "save_trained", crash)
    with pytest.raises(RuntimeError, match="killed while saving"):
        train_run(spec, train, evals, out, threads=2, operational=operational(cfg))
    monkeypatch.setattr(T, "save_trained", saved)


def test_a_crash_after_training_resumes_without_extra_steps_and_keeps_the_metrics_whole(
        tiny_config, tiny_data, tmp_path, monkeypatch, caplog):
    """Killed while saving the trained model: the rerun resumes from the last periodic checkpoint (none is
    written of the finished run, which would train a step more), and its train loss, step count and time
    match a run that was never interrupted; writing checkpoints is not counted as training time."""
    from transformers import Trainer

    slow_save = 0.3
    original_save = Trainer._save_checkpoint

    def slowed(self, *a, **k):  # a large model's checkpoint takes seconds to write: make it visible here
        original_save(self, *a, **k)
        time.sleep(slow_save)

    monkeypatch.setattr(Trainer, "_save_checkpoint", slowed)
    from lorasweep.config import operational

    cfg = tiny_config(max_steps=12, checkpoint_steps=4, checkpoint_min_interval_s=0, logging_steps=3, evals=2)
    args = (run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"])
    out = tmp_path / "crashed"
    _train_and_die_saving_the_model(monkeypatch, cfg, *args, out)
    # checkpoints due at steps 4 and 8 are saved at the logging steps after them, 6 and 9; none at 12
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-9"]
    # and say the machine had died while a later checkpoint was being written: the Trainer's files of it in
    # part, lorasweep's state not yet; the complete checkpoint before it must survive and be resumed
    partial = out / "checkpoints" / "checkpoint-10"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"cut short")
    # and say the first process had a runtime footprint 8 GiB larger than the resumed one will have: its peaks
    # count for what they added over that footprint, not as raw figures of another process
    state_file = out / "checkpoints" / "checkpoint-9" / "lorasweep_state.json"
    state = json.loads(state_file.read_text())
    first_added = state["peaks"]["peak_rss_bytes"] - state["baseline"]["rss_at_load_bytes"]
    state["peaks"]["peak_rss_bytes"] += 8 << 30
    state["baseline"]["rss_at_load_bytes"] += 8 << 30
    assert state["mem_sums"]["rss_bytes"][1] == 9  # one sample a step, steps 1..9
    state["mem_sums"]["rss_bytes"] = [9 * (100 << 30), 9]  # and a mean of 100 GiB over them
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.INFO, logger="lorasweep"):
        m = train_run(*args, out, threads=2, operational=operational(cfg))
    ref = train_run(*args, tmp_path / "reference", threads=2, operational=operational(cfg))

    assert (m["resumed_from_step"], m["train_segments"]) == (9, 2)
    assert "training steps 10-12 of 12 (" in caplog.text  # what is left, not "training 12 steps"
    # steps 1..9 (100 GiB, on a footprint 8 GiB larger than this process's: about 92 GiB here, exactly 100 GiB
    # moved by this process's footprint at load minus the first's) and steps 10..12 (each at most this segment's
    # peak; this test process's RSS, which the tests before it in the session raise, not a constant)
    first_nine = 9 * ((100 << 30) + m["rss_at_load_bytes"] - state["baseline"]["rss_at_load_bytes"])
    assert first_nine / 12 < m["mean_rss_bytes"] <= (first_nine + 3 * m["peak_rss_bytes"]) / 12
    assert first_added <= m["peak_rss_bytes"] - m["rss_at_load_bytes"] < 1 << 30
    assert m["train_steps"] == ref["train_steps"] == 12
    assert (m["train_samples"], m["train_tokens_nonpad"]) == (ref["train_samples"], ref["train_tokens_nonpad"])
    # the mean over all 12 steps, not over the 4 trained after the resume (checkpoint steps are logged)
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)
    assert m["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-4)
    # checkpoints at steps 6 and 9, each slowed by slow_save: training time leaves them out, the wall has them
    assert m["checkpoint_time_s"] >= 2 * slow_save and ref["checkpoint_time_s"] >= 2 * slow_save
    for r in (m, ref):
        assert r["train_wall_s"] == pytest.approx(
            r["train_runtime_s"] + r["eval_time_during_train_s"] + r["checkpoint_time_s"], abs=0.05)
    history = _history(out / "log_history.jsonl")
    assert [h["step"] for h in history if "loss" in h] == [3, 6, 9, 12]  # the logging steps, no others
    # the Trainer's closing record says the whole run's mean, as metrics.json does, not the last segment's
    assert [h["train_loss"] for h in history if "train_loss" in h] == [m["train_loss"]]
    assert [h["step"] for h in history if "eval_loss" in h] == [0, 6, 12]


def test_a_checkpoint_is_not_resumed_on_other_data_and_a_cut_short_state_file_is_no_checkpoint(
        tiny_config, tiny_data, tmp_path, monkeypatch):
    """Snakemake retrains a run whose prepared data changed: a checkpoint of the old data must not be
    resumed (its losses would pair the old split's with the new). A state file a power loss left empty is
    an incomplete checkpoint, not a crash of every rerun."""
    from lorasweep.config import operational

    cfg = tiny_config(max_steps=8, checkpoint_steps=4, checkpoint_min_interval_s=0, logging_steps=2, evals=1)
    spec = run_spec(cfg, "lora-r8")
    out = tmp_path / "run"
    _train_and_die_saving_the_model(monkeypatch, cfg, spec, tiny_data["train"], tiny_data["eval"], out)
    assert (out / "checkpoints" / "checkpoint-4" / "lorasweep_state.json").is_file()
    other = tmp_path / "train-other.jsonl"
    lines = Path(tiny_data["train"]).read_text().splitlines(keepends=True)
    other.write_text("".join(lines[1:]))  # the data changed: one record fewer
    m = train_run(spec, other, tiny_data["eval"], out, threads=2, operational=operational(cfg))
    assert (m["resumed_from_step"], m["train_segments"]) == (None, 1)

    copy = tmp_path / "copy"
    (copy / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (copy / "checkpoints" / "checkpoint-4" / "lorasweep_state.json").write_text("")
    assert find_resumable(copy / "checkpoints", "any") == (None, None)
    assert not (copy / "checkpoints" / "checkpoint-4").exists()


def test_checkpoints_come_every_checkpoint_steps_but_not_sooner_than_the_minimum_interval(tiny_config, tiny_data,
                                                                                        tmp_path, caplog):
    import logging

    from lorasweep.config import operational

    for interval, expected in ((0, [2, 4, 6]), (3600, [])):  # 7 steps: none of the finished run
        cfg = tiny_config(max_steps=7, checkpoint_steps=2, checkpoint_min_interval_s=interval, keep_checkpoints=True)
        out = tmp_path / f"interval-{interval}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lorasweep"):
            m = train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], out, threads=2,
                          operational=operational(cfg))
        written = [int(r.getMessage().split()[3]) for r in caplog.records
                   if r.getMessage().startswith("checkpoint at step")]
        assert written == expected
        kept = sorted(p.name for p in out.glob("checkpoints/checkpoint-*"))
        assert kept == [f"checkpoint-{s}" for s in expected[-1:]]  # the newest complete one only
        assert (m["checkpoint_time_s"] > 0) == bool(expected)


def test_checkpoints_wait_for_a_logging_step_and_leave_the_loss_curve_as_it_is(tiny_config, tiny_data, tmp_path,
                                                                              caplog):
    """checkpoint_steps is operational: it changes where a killed run resumes, not what a run records. A checkpoint
    due between two logging steps is saved at the next one (a resumed run needs the logged losses to cover every
    step up to its checkpoint); it used to add a log there, so the loss curve and train_loss_last depended on
    checkpoint_steps, and with checkpoint_min_interval_s on how fast the machine ran."""
    import logging

    from lorasweep.config import operational

    runs = {}
    for steps in (0, 4, 5):
        cfg = tiny_config(max_steps=12, checkpoint_steps=steps, checkpoint_min_interval_s=0, logging_steps=3,
                          evals=2, keep_checkpoints=True)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lorasweep"):
            m = train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / str(steps),
                          threads=2, operational=operational(cfg))
        written = [int(r.getMessage().split()[3]) for r in caplog.records
                   if r.getMessage().startswith("checkpoint at step")]
        curve = [(h["step"], h["loss"]) for h in _history(tmp_path / str(steps) / "log_history.jsonl") if "loss" in h]
        runs[steps] = (m, written, curve)
    assert runs[0][1] == [] and runs[4][1] == [6, 9] and runs[5][1] == [6]  # due at 4, 8 / 5, 10 (none at 12)
    for steps in (4, 5):
        m, _, curve = runs[steps]
        assert [s for s, _ in curve] == [s for s, _ in runs[0][2]] == [3, 6, 9, 12]
        assert [v for _, v in curve] == pytest.approx([v for _, v in runs[0][2]], abs=1e-5)
        assert (m["train_logs"], m["train_loss_last"]) == (runs[0][0]["train_logs"],
                                                           pytest.approx(runs[0][0]["train_loss_last"], abs=1e-5))


def test_a_signal_saves_a_checkpoint_at_the_end_of_the_step_and_the_rerun_resumes_from_it(tiny_config, tiny_data,
                                                                                          tmp_path):
    """SIGTERM (a cluster's preemption or time limit) or SIGINT (Ctrl-C) while training: training goes on to its next
    logging step, a checkpoint is saved there whatever the checkpoint interval, the job stops with a retryable error,
    and the next attempt resumes from that step into the run an uninterrupted one would have been, its loss curve
    included (a stop between logging steps would split a logged mean in two). A second signal stops at once."""
    from transformers import TrainerCallback

    from lorasweep.config import operational
    from lorasweep.resume import Stopped, retry_may_help

    class SignalAt(TrainerCallback):
        def __init__(self, sig, *steps):
            self.sig, self.steps = sig, steps

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in self.steps:
                os.kill(os.getpid(), self.sig)

    # no periodic checkpoint before step 12 (checkpoint_steps 100), and one long interval between any two
    cfg = tiny_config(max_steps=12, checkpoint_steps=100, checkpoint_min_interval_s=3600, logging_steps=3, evals=2)
    args = (run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"])
    out = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="stopped by SIGTERM at step 6 of 12") as stopped:
        train_run(*args, out, threads=2, operational=operational(cfg), callbacks=[SignalAt(signal.SIGTERM, 4)])
    assert retry_may_help(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the process's again after training
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-6"]  # logging steps 3, 6
    assert not (out / "metrics.json").exists() and not (out / "model").exists()  # nothing that looks finished

    m = train_run(*args, out, threads=2, operational=operational(cfg))
    ref = train_run(*args, tmp_path / "reference", threads=2, operational=operational(cfg))
    assert (m["resumed_from_step"], m["train_segments"], m["train_steps"]) == (6, 2, 12)
    assert (m["train_samples"], m["train_tokens_nonpad"]) == (ref["train_samples"], ref["train_tokens_nonpad"])
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)  # all 12 steps
    assert (m["train_logs"], m["train_loss_last"]) == (ref["train_logs"], pytest.approx(ref["train_loss_last"], abs=1e-4))
    assert m["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-4)
    curve, ref_curve = ([(h["step"], h["loss"]) for h in _history(d / "log_history.jsonl") if "loss" in h]
                        for d in (out, tmp_path / "reference"))
    assert [s for s, _ in curve] == [s for s, _ in ref_curve] == [3, 6, 9, 12]
    assert [v for _, v in curve] == pytest.approx([v for _, v in ref_curve], abs=1e-4)

    # a periodic checkpoint due between the signal and the next logging step is the one saved there
    cfg = tiny_config(max_steps=12, checkpoint_steps=4, checkpoint_min_interval_s=0, logging_steps=3, evals=2)
    args = (run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"])
    with pytest.raises(Stopped, match="at step 6 of 12"):
        train_run(*args, tmp_path / "periodic", threads=2, operational=operational(cfg),
                  callbacks=[SignalAt(signal.SIGTERM, 3)])
    m = train_run(*args, tmp_path / "periodic", threads=2, operational=operational(cfg))
    ref = train_run(*args, tmp_path / "periodic-reference", threads=2, operational=operational(cfg))
    assert [h["step"] for h in _history(tmp_path / "periodic" / "log_history.jsonl") if "loss" in h] == \
        [h["step"] for h in _history(tmp_path / "periodic-reference" / "log_history.jsonl") if "loss" in h] == \
        [3, 6, 9, 12]
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4) and m["resumed_from_step"] == 6

    # Ctrl-C twice: the first asks for the checkpoint, the second interrupts at once (Python's KeyboardInterrupt).
    # Python's own SIGINT handler, whatever this test process was started with (in the background, `&`, SIGINT is
    # ignored, and stays so: test_a_signal_the_process_ignores_stays_ignored_while_training)
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_run(*args, tmp_path / "interrupted", threads=2, operational=operational(cfg),
                      callbacks=[SignalAt(signal.SIGINT, 2, 3)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, started_with)
    assert not list((tmp_path / "interrupted").glob("checkpoints/checkpoint-*"))


def test_a_resumed_full_run_loads_its_tied_output_layer_without_calling_it_missing(tiny_config, tiny_data, tmp_path):
    """A checkpoint leaves out a weight tied to another (OPT's lm_head.weight is the token embedding), and the
    Trainer called it missing on every resumed full fine-tuning run ("There were missing keys in the checkpoint
    model loaded: ['lm_head.weight']", in the job's log): it is loaded with the embedding, and the resumed run is
    the uninterrupted one. A missing weight tied to nothing is still reported."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from lorasweep.config import operational
    from lorasweep.resume import Stopped

    class SigtermAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    cfg = tiny_config(max_steps=8, checkpoint_steps=100, checkpoint_min_interval_s=3600, logging_steps=3, evals=2)
    args = (run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"])
    out = tmp_path / "run"
    with pytest.raises(Stopped, match="at step 6 of 8"):
        train_run(*args, out, threads=2, operational=operational(cfg), callbacks=[SigtermAt4()])
    records = Records()
    transformers_log = logging.getLogger("transformers")  # the library's loggers do not propagate to the root
    transformers_log.addHandler(records)
    try:
        m = train_run(*args, out, threads=2, operational=operational(cfg))
    finally:
        transformers_log.removeHandler(records)
    assert m["resumed_from_step"] == 6
    assert not [msg for msg in records.messages if "missing keys" in msg], records.messages
    ref = train_run(*args, tmp_path / "reference", threads=2, operational=operational(cfg))
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
    assert m["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)

    from lorasweep.trainer import untied_missing_keys

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert untied_missing_keys(model, ["lm_head.weight"]) == []
    assert untied_missing_keys(model, ["lm_head.weight", "model.decoder.embed_tokens.weight"]) == \
        ["lm_head.weight", "model.decoder.embed_tokens.weight"]  # neither loaded: the weight is missing
    assert untied_missing_keys(model, ["model.decoder.final_layer_norm.weight"]) == \
        ["model.decoder.final_layer_norm.weight"]


def test_a_signal_the_process_ignores_stays_ignored_while_training():
    """A job started in the background (`&`) ignores SIGINT: a Ctrl-C meant for the shell must not stop training."""
    from lorasweep.resume import StopOnSignal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.requested is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_resumed_runs_machine_share_counts_its_earlier_segments():
    from lorasweep.provenance import MachineShare

    cores = os.cpu_count() or 1
    share = MachineShare({"other_cpu_s": 30.0 * cores, "wall_s": 100.0})  # 30% busy before the crash
    share.start()
    busy = share.stop()
    assert busy["other_processes_cpu_share_pct"] == pytest.approx(30.0, abs=1.0)
    assert busy["machine_busy_during_train"]


def test_a_failed_training_leaves_no_memory_sampler_running(tiny_config, tiny_data, tmp_path, monkeypatch):
    """Where /proc/self/clear_refs cannot be written, a thread samples RSS while a run trains; a run that fails
    (here out of memory) ends it, so that a process training on (a benchmark's next run) does not keep it."""
    import threading

    from lorasweep import memory
    from lorasweep.config import operational

    def samplers():
        return [t for t in threading.enumerate() if t.name.endswith("(_sample)")]

    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "no-such-dir" / "clear_refs")
    monkeypatch.setenv("LORASWEEP_SIMULATE_OOM_ABOVE_BATCH", "4")
    cfg = tiny_config(max_steps=2, evals=1)
    started, real = [], memory.PeakMemory._sample

    def _sample(self):  # the thread's name ends in its target's name
        started.append(1)
        real(self)

    monkeypatch.setattr(memory.PeakMemory, "_sample", _sample)
    with pytest.raises(TrainingOOM):
        train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2,
                  operational=operational(cfg))
    assert started and not samplers()


def test_an_evaluation_out_of_memory_stops_the_retry_before_it_trains_again(tiny_config, tiny_data, tmp_path,
                                                                            monkeypatch):
    """Snakemake retries a failed training job (for the training batch's out-of-memory errors, which a retry
    halves). An evaluation that ran out of memory would again, after the retry had trained up to it: the retry
    stops before loading the model. A smaller eval batch is other settings: it trains."""
    import torch

    from lorasweep import scoring
    from lorasweep import train as T
    from lorasweep.config import operational
    from lorasweep.resume import EvalOOM

    real_scoring, real_load = scoring.per_example_losses, T.load_model
    loads = []

    def final_eval_oom(trainer):
        if trainer.state.global_step > 0:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_scoring(trainer)

    monkeypatch.setattr(scoring, "per_example_losses", final_eval_oom)
    monkeypatch.setattr(T, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    cfg = tiny_config(max_steps=2, evals=1, eval_batch_size=16)
    out = tmp_path / "run"
    args = (run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], out)
    with pytest.raises(EvalOOM, match="while evaluating at step 2 .*eval batch 16"):
        train_run(*args, threads=2, operational=operational(cfg))
    assert loads == [1] and (out / "eval_oom.json").is_file()
    with pytest.raises(EvalOOM, match="an earlier attempt with these settings"):
        train_run(*args, threads=2, operational=operational(cfg))
    assert loads == [1]  # stopped before loading the model, let alone training
    monkeypatch.setattr(scoring, "per_example_losses", real_scoring)
    smaller = tiny_config(max_steps=2, evals=1, eval_batch_size=4)
    m = train_run(run_spec(smaller, "lora-r8"), *args[1:], threads=2, operational=operational(smaller))
    assert m["train_steps"] == 2 and not (out / "eval_oom.json").exists()


def test_oom_halving_keeps_the_effective_batch(tmp_path):
    training = {"batch_size": 8, "grad_accum": 2}
    assert batch_after_oom(tmp_path, training, "k") == (training, 0)
    err = record_oom(tmp_path, training, 0, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "k")
    assert isinstance(err, TrainingOOM) and "batch 4 x accumulation 4" in str(err)
    assert batch_after_oom(tmp_path, training, "k") == ({"batch_size": 4, "grad_accum": 4}, 1)
    for h in (1, 2):
        err = record_oom(tmp_path, training, h, RuntimeError("again"), "k")
    assert "at per-device batch 2 x accumulation 8" in str(err) and "batch 1 x accumulation 16" in str(err)
    assert "Batch 1 cannot be halved" in str(record_oom(tmp_path, training, 3, RuntimeError("again"), "k"))
    with pytest.raises(TrainingOOM, match="out of memory even at per-device batch 1") as stop:
        batch_after_oom(tmp_path, training, "k")
    assert not stop.value.retryable  # Snakemake's next retry stops at once (failed.json)
    # a batch that is not a power of two: the effective batch stays exactly 12 (6 x 2 -> 3 x 4 -> 1 x 12)
    six = {"batch_size": 6, "grad_accum": 2}
    assert [halve_batch(six, h) for h in (1, 2, 3)] == [{"batch_size": 3, "grad_accum": 4},
                                                        {"batch_size": 1, "grad_accum": 12}, None]
    (tmp_path / "six").mkdir()
    assert "trains with batch 3 x accumulation 4" in str(record_oom(tmp_path / "six", six, 0, RuntimeError("oom")))
    # an odd batch: never "halved" to the batch that just ran out of memory
    assert [halve_batch({"batch_size": 5, "grad_accum": 1}, h) for h in (1, 2)] == [
        {"batch_size": 1, "grad_accum": 5}, None]
    assert [halve_batch({"batch_size": 9, "grad_accum": 1}, h) for h in (1, 2, 3)] == [
        {"batch_size": 3, "grad_accum": 3}, {"batch_size": 1, "grad_accum": 9}, None]
    (tmp_path / "five").mkdir()
    assert "Batch 1 cannot be halved" in str(record_oom(tmp_path / "five", {"batch_size": 5, "grad_accum": 1}, 1,
                                                        RuntimeError("oom")))


def test_a_halved_batch_trains_the_same_steps_as_the_configured_one(tiny_config, tiny_data, tmp_path):
    """What an out-of-memory retry changes (batch 8 x 1 -> 4 x 2) must not change what is learned: the length-
    grouped order is drawn for the effective batch, and the loss of a step is normalised over its tokens, so
    every step sees the same examples and logs the same loss."""
    from lorasweep.config import operational

    out = {}
    for batch, accum in ((8, 1), (4, 2)):
        cfg = tiny_config(batch_size=batch, grad_accum=accum, max_steps=6, evals=1, logging_steps=1)
        m = train_run(run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"], tmp_path / f"b{batch}", threads=2,
                      operational=operational(cfg))
        out[batch] = ([h["loss"] for h in _history(tmp_path / f"b{batch}" / "log_history.jsonl") if "loss" in h],
                      m["train_tokens_nonpad"], m["eval_loss"])
    assert out[4][1] == out[8][1] and out[4][0] == pytest.approx(out[8][0], rel=1e-5)
    assert out[4][2] == pytest.approx(out[8][2], rel=1e-5)


def test_an_out_of_memory_record_of_other_settings_is_not_applied(tmp_path):
    """A run that failed for memory, rerun after the user changed its settings (or data): the new settings
    start from their configured batch instead of inheriting the old attempts' halvings."""
    training = {"batch_size": 4, "grad_accum": 1}
    for h in range(3):
        record_oom(tmp_path, training, h, RuntimeError("CUDA out of memory"), "old settings")
    with pytest.raises(TrainingOOM):
        batch_after_oom(tmp_path, training, "old settings")
    assert batch_after_oom(tmp_path, training, "new settings") == (training, 0)
    assert not (tmp_path / "oom.json").exists()
    (tmp_path / "oom.json").write_text("")  # cut short by a crash: no record
    assert batch_after_oom(tmp_path, training, "new settings") == (training, 0)


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


def _tiny_model_with_code(tiny_config, tmp_path, code_file: str, imports: str) -> tuple[Path, Path]:
    """A copy of the tiny model holding ``code_file``, which imports ``imports`` and, if it is ever run, creates the
    file returned second (custom code must not run)."""
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny_config()["model"]["name_or_path"], model)
    ran = tmp_path / "custom code ran"
    (model / code_file).write_text(f"open({str(ran)!r}, 'w').close()\n{imports}\n")
    return model, ran


def test_a_model_folder_with_its_own_code_is_refused_naming_trust_remote_code(tiny_config, tiny_data, tmp_path):
    """A local model whose config.json names code of its own (auto_map, an architecture transformers does not know):
    transformers refuses to run it without trust_remote_code, but the run's error cut its message after the first
    line (where it says to pass trust_remote_code) and went on with advice for a missing network."""
    model, ran = _tiny_model_with_code(tiny_config, tmp_path, "modeling.py",
                                       "from transformers import OPTConfig as MyConfig, OPTForCausalLM as MyModel")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "modeling.MyConfig",
                                                       "AutoModelForCausalLM": "modeling.MyModel"})
    (model / "config.json").write_text(json.dumps(config))
    spec = run_spec(tiny_config(), "lora-r8")
    spec["model"]["name_or_path"] = str(model)
    with pytest.raises(ModelLoadError) as e:
        train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "out", threads=1)
    assert "model.trust_remote_code: true" in str(e.value) and "modeling.py" in str(e.value)
    assert "network" not in str(e.value) and "HF_HUB_OFFLINE" not in str(e.value)
    assert not ran.exists() and not retry_may_help(e.value)


def test_a_tokenizer_with_its_own_code_is_refused_naming_the_tokenizer(tiny_config, tmp_path):
    """Custom code for the tokenizer only (auto_map in tokenizer_config.json), the architecture one transformers
    knows: the refusal names the tokenizer and the file that asks for it, not the architecture. transformers
    refuses only where it has no tokenizer of its own for the model type (bloom here: with OPT's config it loads
    OPT's tokenizer and leaves the custom code alone)."""
    from lorasweep.train import load_tokenizer

    model, ran = _tiny_model_with_code(tiny_config, tmp_path, "tokenization.py",
                                       "from transformers import PreTrainedTokenizerFast as MyTokenizer")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "bloom"}))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": ["tokenization.MyTokenizer", None]})
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    spec = run_spec(tiny_config(), "lora-r8")
    spec["model"]["name_or_path"] = str(model)
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(spec)
    assert "its tokenizer is not one transformers knows" in str(e.value), str(e.value)
    assert "tokenizer_config.json names code of its own" in str(e.value) and "tokenization.py" in str(e.value)
    assert "architecture" not in str(e.value) and "model.trust_remote_code: true" in str(e.value)
    assert not ran.exists() and not retry_may_help(e.value)


def test_a_qlora_base_that_bitsandbytes_cannot_load_here_says_how_to_go_on(tiny_config, monkeypatch):
    """bitsandbytes built without this machine's device (its supported_torch_devices): transformers refuses to load
    the 4-bit base with a RuntimeError; the run's error names QLoRA, the install docs and how to leave it out."""
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", set(), raising=False)
    spec = run_spec(tiny_config(), "qlora-r8")
    with pytest.raises(ModelLoadError, match=r"run qlora-r8: QLoRA loads its base model in 4 bits with bitsandbytes, "
                                             r"which cannot do that on this machine \(cpu\): RuntimeError: None of") as e:
        load_model(spec, "cpu", "fp32")
    assert "methods: {qlora: {ranks: []}}" in str(e.value)
    assert not retry_may_help(e.value)  # the same every attempt: no retry
    full = run_spec(tiny_config(), "full")  # the other runs load as before
    assert load_model(full, "cpu", "fp32") is not None


def test_a_hub_id_offline_points_at_a_local_copy(tiny_config, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # as for a user who set it before starting: huggingface_hub read it on import, so without this the load went to
    # the network first (46 s of retries on a machine without one) and only lorasweep's message saw the setting
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = run_spec(tiny_config(), "full")
    spec["model"]["name_or_path"] = "facebook/opt-350m-not-cached"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1") as e:
        load_model(spec, "cpu", "fp32")
    assert "local directory" in str(e.value)


def test_a_hub_model_loads_offline_from_the_cache_at_its_revision_and_records_the_commit(tiny_model, tmp_path):
    """The hub-id path, without the hub: a Hugging Face cache holding two commits of `facebook/opt-350m` (main at
    the newer). Unpinned, the model and tokenizer load main's snapshot; `model.revision` pinned to the older commit
    loads that one; each records its commit and the fingerprint of the files it loaded."""
    import shutil

    from safetensors.torch import load_file, save_file

    repo = tmp_path / "hub" / "models--facebook--opt-350m"
    old, new = "1" * 40, "2" * 40
    for commit in (old, new):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
    weights = repo / "snapshots" / new / "model.safetensors"
    tensors = load_file(weights)
    tensors = {k: v + 1 if k.endswith("q_proj.weight") else v for k, v in tensors.items()}  # the upstream update
    save_file(tensors, weights, metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    probe = (
        "import json, sys\n"
        "from lorasweep.provenance import model_files\n"
        "from lorasweep.train import load_model, load_tokenizer\n"
        "revision = sys.argv[1] or None\n"
        "spec = {'model': {'name_or_path': 'facebook/opt-350m', 'revision': revision, 'trust_remote_code': False},\n"
        "        'quantization': None}\n"
        "load_tokenizer(spec)\n"
        "model = load_model(spec, 'cpu', 'fp32')\n"
        "q = next(p for n, p in model.named_parameters() if n.endswith('q_proj.weight'))\n"
        "print(json.dumps({**model_files('facebook/opt-350m', revision), 'q': q.flatten()[0].item()}))\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    seen = {}
    for revision in ("", old):
        out = subprocess.run([sys.executable, "-c", probe, revision], env=env, capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        seen[revision] = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen[""]["model_commit"] == new and seen[old]["model_commit"] == old
    assert seen[""]["model_files_sha256"] != seen[old]["model_files_sha256"]
    assert seen[""]["q"] == pytest.approx(seen[old]["q"] + 1)  # main's weights, and the pinned commit's
    first = tensors[next(k for k in tensors if k.endswith("q_proj.weight"))].flatten()[0].item()
    assert seen[""]["q"] == pytest.approx(first)


def test_a_remote_code_model_pinned_to_a_commit_is_checked_at_that_commit_offline(tiny_model, tiny_data, tmp_path):
    """A trust_remote_code hub model pinned by model.revision, offline, with only that commit in the cache: the early
    target_modules check builds the model's skeleton from the code at that commit, as from_pretrained loads it (it
    fetched the code at main, and failed with "couldn't connect to huggingface.co" before the run loaded anything)."""
    import shutil

    commit = "1" * 40
    snap = tmp_path / "hub" / "models--acme--opt-remote" / "snapshots" / commit
    shutil.copytree(tiny_model, snap)
    cfg = json.loads((snap / "config.json").read_text())
    cfg.update(model_type="opt-remote", architectures=["RemoteOPTForCausalLM"],
               auto_map={"AutoConfig": "configuration_remote.RemoteOPTConfig",
                         "AutoModelForCausalLM": "modeling_remote.RemoteOPTForCausalLM"})
    (snap / "config.json").write_text(json.dumps(cfg))
    (snap / "configuration_remote.py").write_text(
        "from transformers import OPTConfig\n\n\nclass RemoteOPTConfig(OPTConfig):\n    model_type = 'opt-remote'\n")
    (snap / "modeling_remote.py").write_text(
        "from transformers import OPTForCausalLM\n\nfrom .configuration_remote import RemoteOPTConfig\n\n\n"
        "class RemoteOPTForCausalLM(OPTForCausalLM):\n    config_class = RemoteOPTConfig\n")
    probe = (
        "import sys\n"
        "from lorasweep.config import run_spec, validate_config\n"
        "from lorasweep.train import check_model_settings, load_model\n"
        "cfg = validate_config({'model': {'name_or_path': 'acme/opt-remote', 'revision': sys.argv[1],\n"
        "                                 'trust_remote_code': True},\n"
        "                       'dataset': {'source': sys.argv[2]}, 'methods': {'lora': {'ranks': [8]}},\n"
        "                       'training': {'device': 'cpu'}})\n"
        "spec = run_spec(cfg, 'lora-r8')\n"
        "check_model_settings(spec)\n"
        "print(type(load_model(spec, 'cpu', 'fp32')).__name__)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", probe, commit, str(tiny_data["source"])], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "RemoteOPTForCausalLM"


def test_logging_follows_stderr_and_a_scripts_log_file_is_let_go_on_the_way_out(tmp_path, monkeypatch):
    """A process that goes on after a script's logging (a test, a notebook) or swaps its stderr (pytest's
    capture) must not be left with handlers that write to a closed stream."""
    import io
    import logging

    from lorasweep.logs import console_progress, script_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log = console_progress()
    first.close()  # pytest closes a finished test's capture
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.info("step 1 of 2")
    assert "step 1 of 2" in second.getvalue()

    root = logging.getLogger()
    before = root.handlers[:], log.handlers[:], log.level, root.level
    with pytest.raises(SystemExit):
        with script_logging(tmp_path / "job.log") as inside:
            inside.info("training")
            raise RuntimeError("boom")
    assert (root.handlers[:], log.handlers[:], log.level, root.level) == before
    log.info("after the script")
    logging.getLogger("transformers").warning("a library's warning")
    assert "Logging error" not in second.getvalue() and "after the script" in second.getvalue()
    assert "training" in (tmp_path / "job.log").read_text() and "boom" in (tmp_path / "job.log").read_text()


def test_a_scripts_log_leaves_out_the_expected_library_warning_only_from_its_library(tmp_path):
    """EXPECTED_WARNINGS left out of the log every warning that began with its text, whichever module raised it: the
    filter names the module too (transformers, which raises it whoever asks: PEFT's PeftModel on every LoRA run).
    In a script of its own: pytest records the warnings of its tests instead of printing them."""
    import textwrap

    log = tmp_path / "job.log"
    script = textwrap.dedent(f"""
        import warnings
        from transformers import OPTConfig, OPTForCausalLM
        from lorasweep.logs import script_logging
        model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                         num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
        with script_logging({str(log)!r}):
            assert model.is_gradient_checkpointing is False  # transformers' own FutureWarning: left out
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated in another library", FutureWarning,
                                   "other.py", 1, module="other_library")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert "other.py:1: FutureWarning: `is_gradient_checkpointing` is deprecated in another library" in text, text
    assert "modeling_utils" not in text, text


def _killed_while_logging(log: Path) -> None:
    """A script logging to ``log`` (lorasweep.logs.script_logging), killed outright (SIGKILL) at step 40 of 150."""
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from lorasweep.logs import script_logging
        with script_logging({str(log)!r}) as log:
            log.info("step 40 of 150")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL


def test_a_log_keeps_a_second_name_while_its_script_runs_so_a_killed_attempts_log_survives(tmp_path):
    """Snakemake deletes a job's log before its retry. A script that fails keeps its log as <log>.<time>-failed; one
    killed outright (the out-of-memory killer, kill -9) cannot, so the log has a second name while the script runs,
    <log>.<time>-unfinished, which the next attempt's deletion of the log leaves, and which a script that ends
    removes."""
    from lorasweep.logs import script_logging

    log = tmp_path / "job.log"
    _killed_while_logging(log)
    log.unlink()  # what Snakemake does before it retries
    [left] = tmp_path.glob("job.log.*-unfinished")
    assert "step 40 of 150" in left.read_text()

    with script_logging(log) as inside:  # the retry: runs to the end; its second name goes with it
        inside.info("step 150 of 150")
        assert len(list(tmp_path.glob("job.log.*-unfinished"))) == 2
    assert list(tmp_path.glob("job.log.*-unfinished")) == [left]
    with pytest.raises(SystemExit):  # a failing attempt: its log is kept as -failed, not as -unfinished
        with script_logging(log):
            raise RuntimeError("boom")
    [failed] = tmp_path.glob("job.log.*-failed")
    assert "boom" in failed.read_text() and list(tmp_path.glob("job.log.*-unfinished")) == [left]
    with script_logging(log) as inside:  # appending to a log by hand: the kept copy does not grow with it
        inside.info("by hand")
    assert "by hand" in log.read_text() and "by hand" not in failed.read_text()


def test_a_log_deleted_while_its_script_runs_is_kept_under_its_second_name(tmp_path):
    """Killed, snakemake leaves its training job running; the rerun deletes the job's log before it starts the job
    again (which stops: another process trains the run). The first job trains on and writes its log to a file whose
    only name is then its second one: removing that name when the job ended lost the only log of the run that trained.
    Likewise a second process that takes over the log's name (a copy replacing it) must not cost the first its log."""
    from lorasweep.logs import script_logging

    log = tmp_path / "job.log"
    with script_logging(log) as inside:
        inside.info("step 40 of 150")
        log.unlink()  # the rerun's Snakemake deletes the log of the job it believes dead
        inside.info("done: train_loss 1.0")
    [kept] = tmp_path.glob("job.log.*-detached")
    assert "step 40 of 150" in kept.read_text() and "done: train_loss" in kept.read_text()
    assert not list(tmp_path.glob("job.log.*-unfinished"))

    log2 = tmp_path / "other.log"
    with script_logging(log2) as first:
        first.info("first before")
        with script_logging(log2) as second:  # the same log opened again while the first still writes
            second.info("second")
        first.info("first after")
    [detached] = tmp_path.glob("other.log.*-detached")
    assert "first before" in detached.read_text() and "first after" in detached.read_text()
    assert not list(tmp_path.glob("other.log.*-unfinished"))
    with script_logging(log) as inside:  # a log that ends under its own name keeps no second one
        inside.info("again")
    assert [p.name for p in tmp_path.glob("job.log.*")] == [kept.name]


def test_the_failure_summary_names_a_training_job_killed_outright(tmp_path):
    """The summary a failed workflow ends with (onerror) listed only runs with a failed.json, which a job killed by the
    out-of-memory killer or kill -9 never writes: a sweep whose one failure was such a kill ended with no word of it.
    Its log's second name (<log>.<time>-unfinished) names it, unless a retry trained the run since."""
    from lorasweep.resume import failures_since

    since = time.time() - 1
    runs, logs = tmp_path / "results" / "runs", tmp_path / "logs" / "train"
    for run in ("full", "lora-r8"):
        log = logs / run / "seed0.log"
        _killed_while_logging(log)
        log.unlink()  # Snakemake, before the retry
    (runs / "lora-r8" / "seed0").mkdir(parents=True)
    (runs / "lora-r8" / "seed0" / "metrics.json").write_text("{}")  # its retry trained it
    text = failures_since(runs, since, logs)
    assert re.search(r"full/seed0: killed without an error of its own .*seed0\.log\.\S+-unfinished", text), text
    assert "lora-r8" not in text
    assert failures_since(runs, time.time() + 5, logs) == ""  # an earlier workflow's kill is not this one's


def test_the_failure_summary_says_a_kill_came_back_in_every_attempt_and_where_the_last_one_was(tmp_path):
    """A run killed outright in every attempt (the out-of-memory killer at the same point each time, as each retry
    resumes from the last checkpoint) was named by its first attempt's log only, as a one-off kill would be: the
    summary says how many attempts were killed, names the last one's log and what it logged last."""
    from lorasweep.resume import failures_since

    since = time.time() - 1
    runs, logs = tmp_path / "results" / "runs", tmp_path / "logs" / "train"
    log = logs / "full" / "seed0.log"
    for _ in range(3):  # the first attempt and Snakemake's two retries
        _killed_while_logging(log)
        log.unlink()  # Snakemake, before the retry
        time.sleep(0.02)
    last = max(logs.glob("full/seed0.log.*-unfinished"), key=lambda p: p.stat().st_mtime_ns)
    text = failures_since(runs, since, logs)
    assert re.search(r"full/seed0: killed without an error of its own .*, in each of 3 attempts .* most likely "
                     rf"memory .*; the last attempt's log {re.escape(str(last))}, which last said: step 40 of 150$",
                     text, re.M), text
    assert text.count("  full/seed0: ") == 1


def test_the_failure_summary_says_a_retry_was_killed_after_an_attempt_that_failed_with_an_error(tmp_path):
    """Attempt 1 failed with an error a retry may help (failed.json: a network error), attempt 2 was killed outright
    (no failed.json of its own): the summary gave attempt 1's error as the run's failure and left out the kill of
    the last attempt and its log, the one to read."""
    from lorasweep.resume import failures_since, record_failure

    since = time.time() - 1
    runs, logs = tmp_path / "results" / "runs", tmp_path / "logs" / "train"
    record_failure(runs / "full" / "seed0", 1, ConnectionError("hub unreachable"))
    time.sleep(0.02)
    log = logs / "full" / "seed0.log"
    _killed_while_logging(log)  # attempt 2
    [left] = logs.glob("full/seed0.log.*-unfinished")
    text = failures_since(runs, since, logs)
    assert re.search(rf"full/seed0: killed without an error of its own .*; its log {re.escape(str(left))}, which last "
                     r"said: step 40 of 150 \(attempt 1 before it: ConnectionError: hub unreachable\)$", text, re.M), text
    assert text.count("  full/seed0: ") == 1

    # an attempt killed before the one that failed with an error: the error is the last attempt's, as before
    runs2, logs2 = tmp_path / "2" / "runs", tmp_path / "2" / "logs"
    _killed_while_logging(logs2 / "full" / "seed0.log")  # attempt 1
    time.sleep(0.02)
    record_failure(runs2 / "full" / "seed0", 2, ValueError("bad"))
    text = failures_since(runs2, since, logs2)
    assert "full/seed0: ValueError: bad (attempt 2;" in text and "killed" not in text


def test_the_failure_summary_after_ctrl_c_says_to_rerun_with_rerun_incomplete(tmp_path):
    """Ctrl-C mid-training: the run stops at a checkpoint (Stopped) and Snakemake marks the job incomplete. The
    summary's last line said "Fix the cause and run snakemake again: it trains only what is missing", and that command
    stops with Snakemake's IncompleteFilesException: it says to run again with --rerun-incomplete, which resumes."""
    from lorasweep.resume import Stopped, failures_since, record_failure

    since = time.time() - 1
    runs, logs = tmp_path / "results" / "runs", tmp_path / "logs" / "train"
    record_failure(runs / "full" / "seed0", 1, Stopped("stopped by SIGINT at step 80 of 135, after saving checkpoint-80"))
    text = failures_since(runs, since, logs)
    assert "full/seed0: Stopped: stopped by SIGINT" in text
    last = text.splitlines()[-1]
    assert "--rerun-incomplete" in last and "resumes" in last and "Fix the cause" not in last, last
    # beside a run that failed with an error: both are said
    record_failure(runs / "lora-r8" / "seed0", 1, ValueError("bad"))
    last = failures_since(runs, since, logs).splitlines()[-1]
    assert "Fix the cause" in last and "--rerun-incomplete" in last, last
    # no signal, no word of it
    (runs / "full" / "seed0" / "failed.json").unlink()
    assert "--rerun-incomplete" not in failures_since(runs, since, logs)


def test_a_second_process_cannot_train_a_run_another_is_training(tmp_path, tiny_config, tiny_data):
    """Killed, snakemake leaves its training job running; the rerun must not start a second process training into
    the same folder (their checkpoints and log history would interleave): it stops at once, naming the first."""
    import socket

    from lorasweep.resume import RunBusy
    from lorasweep.train import train_job

    cfg = tiny_config(max_steps=1, evals=1)
    out = tmp_path / "run"
    args = (cfg, run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"], tiny_data["summary"], out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lorasweep.resume import RunLock; "
                               "lock = RunLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=rf"another process \(pid {holder.pid} on {socket.gethostname()}\) is "
                                          "training this run"):
            train_job(*args, threads=2)
        assert {p.name for p in out.iterdir()} <= {".train.lock", "failed.json"}  # nothing trained
    finally:
        holder.kill()
        holder.communicate()  # waits, and closes its pipe (no ResourceWarning)
    assert train_job(*args, threads=2)["train_steps"] == 1  # the lock went with its process


def test_a_checkpoint_whose_files_were_cut_short_is_not_resumed(tiny_config, tiny_data, tmp_path, monkeypatch,
                                                                 caplog):
    """A checkpoint file cut short after it was written (a full disk, a copy, a crash before the page cache reached
    the disk) made every rerun fail loading it (a review saw SafetensorError on all three attempts): lorasweep's
    state records each file's size, and a checkpoint whose files differ is dropped like a half-written one."""
    import logging

    from lorasweep.config import operational

    cfg = tiny_config(max_steps=8, checkpoint_steps=4, checkpoint_min_interval_s=0, logging_steps=2, evals=1)
    spec = run_spec(cfg, "full")
    out = tmp_path / "run"
    _train_and_die_saving_the_model(monkeypatch, cfg, spec, tiny_data["train"], tiny_data["eval"], out)
    weights = out / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with caplog.at_level(logging.WARNING, logger="lorasweep.train"):
        m = train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2, operational=operational(cfg))
    assert (m["resumed_from_step"], m["train_segments"], m["train_steps"]) == (None, 1, 8)
    assert "checkpoint-4: model.safetensors holds 100,000 bytes" in caplog.text


def test_collect_refuses_a_run_whose_files_were_cut_short_or_written_by_two_processes(tiny_config, tiny_data,
                                                                                      tmp_path):
    """A log history cut short drew loss curves that ended before the tables' step (a review: step 80 of 135);
    two processes training one run interleaved their steps; a metrics.json cut short failed with a bare
    JSONDecodeError. collect names the file and how to retrain its run."""
    from lorasweep.collect import collect
    from lorasweep.config import operational

    cfg = tiny_config(max_steps=6, logging_steps=1, evals=2)
    run = tmp_path / "results" / "runs" / "full" / "seed0"
    train_run(run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"], run, threads=2, operational=operational(cfg))
    files = [[run / "metrics.json"], [run / "log_history.jsonl"], tmp_path / "m.csv", tmp_path / "h.csv",
             [run / "eval_losses.json"], tmp_path / "e.csv"]
    collect(*files)
    history = (run / "log_history.jsonl").read_text().splitlines(keepends=True)
    retrain = "retrain the run: snakemake ... --forcerun results/runs/full/seed0/metrics.json"
    (run / "log_history.jsonl").write_text("".join(history[:4]))
    with pytest.raises(ValueError, match=r"log_history.jsonl: \d training logs where metrics.json counts 6.*"
                                         r"last evaluation is at step 0, training ended at step 6.*" + retrain):
        collect(*files)
    (run / "log_history.jsonl").write_text("".join(history[:5] + history[2:]))  # a second writer's steps
    with pytest.raises(ValueError, match="steps go back .*two processes wrote into it"):
        collect(*files)
    (run / "log_history.jsonl").write_text("".join(history))
    metrics = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(metrics[: len(metrics) // 2])
    with pytest.raises(ValueError, match="metrics.json: not whole .*" + retrain):
        collect(*files)


def test_a_damaged_tokenization_cache_is_dropped_and_the_retry_tokenizes_again(tiny_config, tiny_data, tmp_path):
    """An Arrow file of the splits' tokenization cache cut short failed every attempt with an OSError naming no
    folder (a review), and `--forcerun prepare_data` kept the cache of identical splits: the job now deletes the
    cache and fails with a retryable error, and the retry (a fresh attempt) tokenizes again."""
    import shutil

    from lorasweep.config import operational
    from lorasweep.data import CacheDamaged, cache_dir
    from lorasweep.resume import retry_may_help

    data = tmp_path / "data"
    data.mkdir()
    train, evals = (Path(shutil.copy(tiny_data[k], data / f"{k}.jsonl")) for k in ("train", "eval"))
    cfg = tiny_config(max_steps=1, evals=1)
    spec = run_spec(cfg, "full")
    ref = train_run(spec, train, evals, tmp_path / "a", threads=2, operational=operational(cfg))
    cache = cache_dir(train, evals)
    arrows = sorted(cache.rglob("cache-*.arrow"), key=lambda p: p.stat().st_size)  # TRL's tokenized splits
    assert arrows
    arrows[-1].write_bytes(arrows[-1].read_bytes()[:1000])
    with pytest.raises(CacheDamaged, match=f"tokenization cache {cache} could not be read") as err:
        train_run(spec, train, evals, tmp_path / "b", threads=2, operational=operational(cfg))
    assert retry_may_help(err.value) and not cache.exists()
    m = train_run(spec, train, evals, tmp_path / "b", threads=2, operational=operational(cfg))
    assert m["train_info"]["data_tokenized"]  # tokenized again, not read from a cache
    assert m["eval_loss"] == ref["eval_loss"]



@pytest.mark.slow
def test_a_run_whose_retrain_failed_is_trained_again_by_the_next_plain_run(tmp_path):
    """The README's retrain of one run (--forcerun its metrics.json) fails for good (here out of memory at every
    batch; a full disk alike): Snakemake has deleted the run's outputs. The next plain snakemake run trains it again
    and redoes the report, instead of finding the report up to date ("Nothing to be done") while it shows a run
    whose files are gone."""
    workdir, args = _workdir(tmp_path, max_steps=4, evals=1, logging_steps=2)
    small = workdir / "small.yaml"
    small.write_text(yaml.safe_dump({"methods": {"lora": {"ranks": [8]}, "qlora": {"ranks": []}}}))
    args = (*args, small)
    run_snakemake(*args, workdir=workdir)
    run = workdir / "results" / "runs" / "full" / "seed0"
    assert (run / "metrics.json").is_file()

    proc = run_snakemake(*args, "--forcerun", "results/runs/full/seed0/metrics.json", workdir=workdir, check=False,
                         env={"LORASWEEP_SIMULATE_OOM_ABOVE_BATCH": "0"})
    assert proc.returncode != 0 and "out of memory" in proc.stdout + proc.stderr
    assert not (run / "metrics.json").exists() and not (run / "model").exists()  # Snakemake deleted them
    # the workflow's last words name the failed run, its error and its log (the jobs' own accounts scroll by)
    tail = (proc.stdout + proc.stderr)[-1500:]
    assert "lorasweep: these training runs failed" in tail, tail
    assert re.search(r"full/seed0: TrainingOOM: .*logs/train/full/seed0\.log", tail), tail
    assert "lora-r8" not in tail.split("these training runs failed")[1]  # it did not fail
    assert (workdir / "reports" / "summary.md").is_file()  # the report of the run as it was

    # the cause gone, the next run trains full again (and only it) and brings the report up to date
    planned = run_snakemake("-n", *args, workdir=workdir).stdout
    assert "Nothing to be done" not in planned
    trained = re.findall(r"^rule train:\n(?:.*\n)*?\s+wildcards: run=([\w-]+), seed=(\d+)", planned, re.M)
    assert trained == [("full", "0")], planned[-3000:]
    assert re.search(r"^rule report:", planned, re.M)
    run_snakemake(*args, workdir=workdir)
    assert json.loads((run / "metrics.json").read_text())["train_steps"] == 4
    assert "Nothing to be done" in run_snakemake("-n", *args, workdir=workdir).stdout


def _with_file_size_limit(limit: int, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` run in a fresh Python whose files may grow to ``limit`` bytes at most (``ulimit -f``): a write past it
    fails with EFBIG (Python ignores SIGXFSZ), as on a disk that takes no more."""
    import textwrap

    script = "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0}))\n".format(limit) + \
        textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=env)


def test_a_checkpoint_that_does_not_fit_names_itself_and_the_limit_and_the_rerun_trains(tiny_config, tiny_data,
                                                                                      tmp_path):
    """Writing a checkpoint past a file size limit (or onto a full disk) failed with torch.save's own words,
    "[enforce fail at inline_container.cc:672] . unexpected pos 991488 vs 991376" (a review, with `ulimit -f 1000`):
    no file, no cause. The error names the checkpoint, what may still be written and what to do; the rerun, with
    room again, discards the checkpoint cut short and trains."""
    import shutil

    from lorasweep.config import operational

    data = tmp_path / "data"
    data.mkdir()
    train, evals = (Path(shutil.copy(tiny_data[k], data / f"{k}.jsonl")) for k in ("train", "eval"))
    cfg = tiny_config(max_steps=6, checkpoint_steps=2, checkpoint_min_interval_s=0, logging_steps=2, evals=1)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    # full fine-tuning's checkpoint: the weights (~0.8 MB) fit, AdamW's state (~1.6 MB) does not
    proc = _with_file_size_limit(1_000_000, f"""
        import json
        from lorasweep.config import run_spec
        from lorasweep.logs import script_logging
        from lorasweep.train import train_job
        cfg = json.load(open("cfg.json"))
        with script_logging("job.log"):
            train_job(cfg, run_spec(cfg, "full"), {str(train)!r}, {str(evals)!r}, None, {str(out)!r}, threads=2,
                      attempt=1)
    """, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert re.search(rf"lorasweep: CheckpointNotWritten: checkpoint {out}/checkpoints/checkpoint-2 could not be "
                     r"written \(RuntimeError: .*\); [\d,.]+ MiB free on the file system of .*this process may write no "
                     r"file larger than 1,000,000 bytes \(`ulimit -f`", proc.stderr), proc.stderr
    assert "Make room, then run snakemake again" in proc.stderr
    assert json.loads((out / "failed.json").read_text())["error"] == "CheckpointNotWritten"
    m = train_run(run_spec(cfg, "full"), train, evals, out, threads=2, operational=operational(cfg))
    assert (m["resumed_from_step"], m["train_steps"]) == (None, 6)


def test_a_write_that_does_not_fit_says_so_and_its_failure_record_hides_nothing(tmp_path):
    """A job whose write hit a file size limit or a full disk said only "OSError: [Errno 27] File too large" (no
    file, no cause: prepare_data and training under `ulimit -f`), and on a full disk training's failure record
    (failed.json) could not be written either: its own ENOSPC took the job's error's place, naming failed.json.tmp,
    which stayed behind empty (as prepare_data's splits left train.jsonl.tmp). The console says what stopped the write
    and what to do; a record that cannot be written is warned of; no part-written .tmp is left."""
    proc = _with_file_size_limit(100, """
        from lorasweep.data import write_jsonl
        from lorasweep.logs import script_logging
        from lorasweep.resume import record_failure
        with script_logging("job.log"):
            try:
                write_jsonl("train.jsonl", [{"prompt": "x" * 100_000}])  # prepare_data's
            except OSError as e:
                record_failure("run", 1, e)
                raise
    """, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"lorasweep: OSError: \[Errno 27\] File too large -- a write failed \(File too large\): "
                     r"[\d,.]+ MiB free .*no file larger than 100 bytes.*run snakemake again", proc.stderr), proc.stderr
    assert "could not record the failure in run/failed.json" in proc.stderr
    assert not list((tmp_path / "run").iterdir()) and not list(tmp_path.glob("train.jsonl*"))


def test_a_log_that_does_not_fit_costs_neither_the_error_nor_the_jobs_outputs(tmp_path):
    """A job's log on a full disk: the job (collect, under a review's full logs/ disk) wrote its outputs, then closing
    its log raised ENOSPC out of script_logging, so the job failed with a bare traceback, Snakemake deleted its outputs,
    and its log's second name (<log>.<time>-unfinished) stayed, which the failure summary reads as a job killed by the
    out-of-memory killer. A job that succeeds now succeeds, saying its log lacks its end; a job that fails still
    shows its error on the console with the traceback the log could not take."""
    code = """
        import sys
        from lorasweep.logs import script_logging
        with script_logging("job.log") as log:
            log.info("x" * 300)
            if False:
                raise ValueError("the job's own error")
        print("ended", file=sys.__stderr__)
    """
    ok = _with_file_size_limit(200, code, tmp_path)
    assert ok.returncode == 0 and "ended" in ok.stderr, ok.stderr
    assert "lorasweep: the log job.log is missing its last lines ([Errno 27] File too large; " in ok.stderr
    assert f"free on the file system of {tmp_path};" in ok.stderr
    assert "no file larger than 200 bytes" in ok.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["job.log"]
    (tmp_path / "job.log").unlink()
    failed = _with_file_size_limit(200, code.replace("if False:", "if True:"), tmp_path)
    assert failed.returncode == 1
    assert "Traceback" in failed.stderr and "lorasweep: ValueError: the job's own error" in failed.stderr
    assert not list(tmp_path.glob("*-unfinished"))
