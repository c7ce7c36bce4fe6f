"""Cluster and local profiles plan the right jobs; the conda environment pins what the package pins."""

import re
import tomllib
from pathlib import Path

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


def _name(requirement):
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>\[ ]", requirement)[0]).lower()


def test_constraints_pin_what_the_package_pins_and_the_readme_and_ci_install_with_them():
    """envs/constraints.txt pins the whole stack a fresh install resolves; it must agree with pyproject.toml's
    own pins (a pin changed in one and not the other would make pip refuse to install), hold one line per
    package, and be what both README's install command and .ci/run pass to pip."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["test"]
    lines = [line for line in (REPO / "envs" / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), lines
    constraints = {_name(line): line.split("==")[1] for line in lines}
    assert len(constraints) == len(lines)
    assert {_name(pin): constraints.get(_name(pin)) for pin in pins} == {_name(pin): pin.split("==")[1]
                                                                       for pin in pins}
    assert "lorasweep" not in constraints and "+" not in constraints["torch"]  # a CUDA build of the release passes
    install = 'pip install -e ".[test]" -c envs/constraints.txt'
    assert install in (REPO / "README.md").read_text()
    assert re.search(r'pip install [^\n]*-e "\.\[test\]" -c envs/constraints\.txt', (REPO / ".ci" / "run").read_text())


def test_constraints_pin_every_requirement_of_the_packages_they_pin():
    """Every package the pinned ones require (their markers as on this machine, no extras) is pinned too: pip freeze
    leaves out setuptools, which torch requires (a fresh Python 3.11 venv holds an older one, which pip upgrades to
    the newest), so the file left it free."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    pinned = {_name(line) for line in (REPO / "envs" / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    free = {}
    for name in sorted(pinned):
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:  # not installed here
            continue
        for requirement in map(Requirement, requires):
            if (requirement.marker is None or requirement.marker.evaluate({"extra": ""})) \
                    and _name(requirement.name) not in pinned:
                free.setdefault(_name(requirement.name), []).append(name)
    assert not free, f"required but not pinned: {free}"


def test_the_conda_environment_gets_lorasweep_itself_from_its_post_deploy_script(tmp_path):
    """--sdm conda builds envs/lorasweep.yaml from a copy under .snakemake/conda, so the file can name only the
    dependencies, and a job's script, run from .snakemake/scripts with the environment's python, found no lorasweep
    (the README's editable install puts no path on sys.path for Snakemake to pass on). Snakemake runs
    envs/lorasweep.post-deploy.sh in the new environment: it installs the package of its own checkout. A bare venv
    stands in for the conda environment (no conda here)."""
    import os
    import subprocess
    import sys

    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"  # as the environment's activation does
    job = tmp_path / ".snakemake" / "scripts" / "tmp_train.py"
    job.parent.mkdir(parents=True)
    job.write_text("import lorasweep\nprint(lorasweep.__file__)\n")

    def imported():
        return subprocess.run([str(env_dir / "bin" / "python"), str(job)], cwd=tmp_path, env=env, capture_output=True,
                              text=True)

    assert "No module named 'lorasweep'" in imported().stderr  # what a job met without the script
    deploy = REPO / "envs" / "lorasweep.post-deploy.sh"
    assert deploy.read_text().startswith("#!/usr/bin/env bash")  # Snakemake runs it with its shebang's interpreter
    subprocess.run(["/usr/bin/env", "bash", str(deploy)], cwd=tmp_path, env=env, check=True, timeout=600)
    done = imported()
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO / "lorasweep" / "__init__.py"


FAKE_CONDA = """#!/usr/bin/env bash
# what Snakemake asks conda for while it builds an environment; the environment is a bare venv
set -euo pipefail
case "$1 ${2:-}" in
  "info --json") echo '{"conda_prefix": "%(root)s", "platform": "linux-64"}' ;;
  "--version ") echo "conda 24.11.3" ;;
  "config --get") echo '{"get": {"channel_priority": "strict"}}' ;;
  "env create") while [ $# -gt 0 ]; do [ "$1" = --prefix ] && prefix=$2; shift; done; "%(python)s" -m venv "$prefix" ;;
  "clean -y") ;;
  *) echo "conda stand-in: $* not supported" >&2; exit 1 ;;
esac
"""


def test_snakemake_sdm_conda_installs_this_checkout_into_the_environment(tmp_path):
    """Snakemake runs the post-deploy script from a copy beside the environment (.snakemake/conda/<hash>.post-deploy.sh,
    Snakemake 9.27.1's Env.create), not from envs/: the script installed the folder above its own, ``.snakemake``
    (pip: "does not appear to be a Python project"), and every ``--sdm conda`` run stopped building its environment.
    The workflow now names its checkout to the script (LORASWEEP_CHECKOUT). Real Snakemake, from another working
    folder (-d); a stand-in for conda (none here) answers what Snakemake asks and builds a bare venv."""
    import os
    import subprocess
    import sys

    from conftest import snakemake_cmd

    root = tmp_path / "conda"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "conda").write_text(FAKE_CONDA % {"root": root, "python": sys.executable})
    (root / "bin" / "conda").chmod(0o755)
    (root / "bin" / "activate").write_text('export PATH="$1/bin:$PATH"\n')  # sourced with the environment's path
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LORASWEEP_CHECKOUT")}
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(snakemake_cmd("--sdm", "conda", "--conda-create-envs-only", "--cores", 1, "--configfile",
                                        REPO / "config" / "tiny.yaml", workdir=work),
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running post-deploy script .snakemake/conda/" in proc.stdout + proc.stderr  # the copy ran, as on conda
    (python,) = (work / ".snakemake" / "conda").glob("*/bin/python")
    done = subprocess.run([str(python), "-c", "import lorasweep; print(lorasweep.__file__)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO / "lorasweep" / "__init__.py"


def test_the_wheel_holds_the_whole_package_and_its_license_and_builds_without_deprecated_metadata(tmp_path):
    """``pip install .`` (not ``-e``) and any wheel install the package from its wheel: it must hold every file of
    lorasweep/ (the schema ``load_config`` reads beside config.py included), say the version ``__version__`` says, and
    carry the license pyproject.toml declares. The license was written as a TOML table (``{ text = ... }``), which
    setuptools (84.2.1, the newest, that pip's build takes) warns about on every build and stops building on
    2027-02-18; and the LICENSE file the Apache-2.0 terms ask a copy to travel with was missing. Built from the
    checkout's files (a copy: a build writes build/ and an egg-info into its source) with this environment's
    setuptools, offline."""
    import shutil
    import subprocess
    import sys
    import zipfile

    import lorasweep

    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", str(src), "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert "Deprecat" not in build.stdout + build.stderr, (build.stdout + build.stderr)[-4000:]
    (wheel,) = (tmp_path / "dist").glob("lorasweep-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"lorasweep-{lorasweep.__version__}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
    package = {name for name in files if name.startswith("lorasweep/")}  # the checkout's, data files included
    assert "lorasweep/config.schema.yaml" in package and package <= names, sorted(package - names)
    assert f"\nVersion: {lorasweep.__version__}\n" in metadata
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == lorasweep.__version__
    assert "\nLicense-Expression: Apache-2.0\n" in metadata and "\nLicense-File: LICENSE\n" in metadata
    assert f"{info}/licenses/LICENSE" in names
