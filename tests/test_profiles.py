"""Cluster and local profiles plan the right jobs; the conda environment pins what the package pins."""

import re
import tomllib

import pytest
import yaml

from conftest import REPO, run_snakemake
from test_workflow import job_stats, offline_env

PROFILES = REPO / "profiles"


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profile_dry_run_plans_the_sweep_with_gpus_only_on_training(profile, tmp_path):
    env = offline_env(tmp_path)
    proc = run_snakemake("-n", "--profile", PROFILES / profile, "--configfile", REPO / "config" / "config.yaml",
                         workdir=tmp_path, env=env)
    assert job_stats(proc.stdout)["train"] == 5
    jobs = re.findall(r"^(?:local)?rule (\w+):.*?^\s+resources: ([^\n]*)", proc.stdout, re.M | re.S)
    gpu = {rule for rule, res in jobs if "gpu=1" in res}
    assert gpu == {"train"} and sum(1 for rule, res in jobs if rule == "train" and "gpu=1" in res) == 5
    if profile == "slurm":
        train = [res for rule, res in jobs if rule == "train"][0]
        assert "mem_mb=64000" in train and "runtime=240" in train and "slurm_partition=gpu" in train
        # every CPU of a training job's allocation is a torch thread (a dry run prints threads for local jobs)
        local = run_snakemake("-n", "--profile", PROFILES / profile, "--executor", "local", "--cores", 16,
                              "--configfile", REPO / "config" / "config.yaml", workdir=tmp_path, env=env).stdout
        threads = set(re.findall(r"^rule train:.*?^\s+threads: (\d+)", local, re.M | re.S))
        assert threads == {re.search(r"cpus_per_task=(\d+)", train).group(1)} == {"8"}, threads
        light = [res for rule, res in jobs if rule == "collect"][0]
        assert "gpu" not in light and "mem_mb=8000" in light


def test_local_profile_encodes_the_readme_command():
    cfg = yaml.safe_load((PROFILES / "local" / "config.yaml").read_text())
    assert cfg["cores"] == 4 and cfg["resources"] == ["gpu=1"]


def test_slurm_executor_plugin_is_installed():
    from snakemake_executor_plugin_slurm import ExecutorSettings  # noqa: F401


def test_conda_env_pins_the_same_versions_as_the_package():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "lorasweep.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps)
    assert "python=3.11" in env["dependencies"]
