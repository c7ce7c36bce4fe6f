"""The peak-memory meter on real allocations: training peaks leave evaluations out."""

import time

import pytest
import torch

from lorasweep import memory
from lorasweep.memory import PeakMemory

MiB = 2**20


def _touch(mib: int) -> torch.Tensor:
    return torch.ones(mib * MiB // 4)  # written, so its pages are resident


@pytest.fixture(params=["VmHWM", "sampled"])
def meter(request, monkeypatch, tmp_path):
    """Both ways of measuring: the kernel's high-water mark, and (where it cannot be reset) a sampler."""
    if request.param == "sampled":
        monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "absent" / "clear_refs")  # cannot be written
    m = PeakMemory("cpu", sample_interval_s=0.01)
    m.kind = request.param
    yield m
    m.read()  # stops a sampler left running by a failed test


def test_an_excluded_stretch_has_its_own_peak_and_leaves_the_training_peak_alone(meter):
    start = meter.reset()["rss_at_load_bytes"]
    train = _touch(64)  # "training" holds 64 MiB
    time.sleep(0.1)
    with meter.excluded():
        evaluation = _touch(384)  # "evaluation" briefly needs 384 MiB more
        time.sleep(0.1)
        del evaluation
    train2 = _touch(32)  # training goes on after it
    time.sleep(0.1)
    got = meter.read()
    del train, train2
    assert 90 * MiB <= got["peak_rss_bytes"] - start < 250 * MiB  # 64 + 32 MiB, never the evaluation's 384
    assert got["eval_peak_rss_bytes"] - start >= 440 * MiB  # 64 held + 384 inside the stretch
    assert "peak_cuda_allocated_bytes" not in got and "eval_peak_cuda_allocated_bytes" not in got
    assert got["peak_rss_method"].startswith("VmHWM" if meter.kind == "VmHWM" else "RSS sampled")


def test_without_an_excluded_stretch_the_peak_counts_everything(meter):
    start = meter.reset()["rss_at_load_bytes"]
    big = _touch(384)
    time.sleep(0.1)
    del big
    got = meter.read()
    assert got["peak_rss_bytes"] - start >= 380 * MiB
    assert not any(k.startswith("eval_peak_") for k in got)


def test_excluded_before_reset_does_nothing():
    meter = PeakMemory("cpu")
    with meter.excluded():  # the untrained model's evaluation comes before the baseline
        pass
    assert meter.excluded_peaks == {} and not meter.active


def test_the_peak_counts_from_the_reset_not_from_what_came_before(meter):
    """What the process held before the baseline (loading the model, the untrained model's evaluation) is not
    training's peak: reset() starts the high-water mark afresh."""
    before = _touch(384)
    time.sleep(0.1)
    del before
    start = meter.reset()["rss_at_load_bytes"]  # frees the heap back to the system first
    train = _touch(32)
    time.sleep(0.1)
    got = meter.read()
    del train
    assert 30 * MiB <= got["peak_rss_bytes"] - start < 200 * MiB  # 32 MiB, never the 384 MiB before the reset


def test_the_eval_peak_is_the_highest_of_all_evaluations():  # P02
    pm = PeakMemory("cpu")
    start = pm.reset()["rss_at_load_bytes"]
    with pm.excluded():
        big = torch.ones(384 * MiB // 4)
        time.sleep(0.1)
        del big
    with pm.excluded():  # a later, smaller evaluation
        small = torch.ones(16 * MiB // 4)
        del small
    got = pm.read()
    assert got["eval_peak_rss_bytes"] - start >= 380 * MiB
