"""Real snakemake runs in temporary directories: dry runs, lint, and the whole tiny sweep."""

import json
import math
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, run_snakemake

NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access attempted during a test that must stay offline")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
"""


def job_stats(output: str) -> dict:
    """The dry run's 'Job stats' table as {rule: count}."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def offline_env(tmp_path) -> dict:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    return {"PYTHONPATH": str(guard), "HF_HUB_OFFLINE": "0"}


def test_default_config_dry_run_plans_five_gpu_training_jobs_offline(tmp_path):
    proc = run_snakemake("-n", "--cores", 4, "--resources", "gpu=1", "--configfile", REPO / "config" / "config.yaml",
                         workdir=tmp_path, env=offline_env(tmp_path))
    stats = job_stats(proc.stdout)
    assert stats == {"prepare_data": 1, "train": 5, "merge": 4, "verify": 4, "switch": 1, "samples": 1, "collect": 1,
                     "plot": 1, "report": 1, "all": 1}
    for run in ("full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"):
        assert f"results/runs/{run}/seed42/metrics.json" in proc.stdout  # seeds: null -> the one seed, 42
    assert len(re.findall(r"resources: .*gpu=1", proc.stdout)) == 5  # only training jobs hold the GPU
    assert not (tmp_path / "results").exists()


def test_network_guard_really_blocks(tmp_path):
    env = offline_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                          capture_output=True, text=True, env={**env, "PATH": ""})
    assert "network access attempted" in proc.stderr


def test_invalid_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\ndataset: {source: d.json}\nmethods: {lora: {ranks: [-1]}}\n")
    proc = run_snakemake("-n", "--cores", 1, "--configfile", bad, workdir=tmp_path, check=False)
    assert proc.returncode != 0
    assert "methods.lora.ranks[0] = -1: must be a rank (integer >= 1)" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("override, key", [("training={epochs: 1}", "training.epochs = '1'"),
                                           ("methods={lora: {ranks: [8]}}", "methods.lora.ranks[0] = '8'"),
                                           ("seeds=[0, 1]", "seeds[0] = '0'")])
def test_a_nested_config_override_read_as_text_says_to_use_a_configfile(tmp_path, override, key):
    """Snakemake reads a nested or list value of --config with YAML's BaseLoader: every number arrives as text."""
    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", "--config", override,
                         workdir=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and key in out
    assert "--config passes a nested or list value such as training={epochs: 1} as text: set it in a file given " \
           "with --configfile" in out.replace("\n", " ")


def test_a_local_dataset_that_is_not_there_fails_before_any_job_naming_the_key(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("dataset: {source: data/missing.json}\n")
    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", override,
                         workdir=tmp_path, check=False)
    assert proc.returncode != 0
    assert "dataset.source = 'data/missing.json': file not found" in proc.stdout + proc.stderr
    (tmp_path / "data").mkdir()  # there: planned as usual
    (tmp_path / "data" / "missing.json").write_text("[]")
    run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", override, workdir=tmp_path)


def test_a_local_dataset_is_known_by_its_content_not_its_time_stamp(tmp_path):
    """A local dataset over 1 MB (Snakemake compares the content of smaller inputs itself) whose time stamp moves
    (a copy, a checkout, a touch) prepares nothing again, so nothing retrains; a change of its content does."""
    records = [{"instruction": f"Write function number {i}.", "input": "",
                "output": f"def f{i}(x):\n" + "    x = x + 1\n" * 40 + "    return x"} for i in range(2500)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    assert data.stat().st_size > 1_000_000
    (tmp_path / "local.yaml").write_text("dataset: {source: data.json}\n")
    args = ("results/data/summary.json", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", "local.yaml")
    run_snakemake(*args, workdir=tmp_path)
    later = data.stat().st_mtime + 60
    os.utime(data, (later, later))
    assert "Nothing to be done" in run_snakemake("-n", *args, workdir=tmp_path).stdout
    data.write_text(json.dumps(records[1:]))
    planned = run_snakemake("-n", *args, workdir=tmp_path).stdout
    assert re.findall(r"^rule (\w+):", planned, re.M) == ["prepare_data"], planned[-2000:]
    assert "Params have changed since last execution" in planned


def test_a_local_model_is_known_by_its_content_and_each_run_records_what_it_loaded(tmp_path, tiny_model):
    """New weights or a new tokenizer under the same local path retrain the runs (before, nothing did: the path was
    the only setting); a copy or a touch of its files retrains none. The run records the files' fingerprint."""
    import shutil

    from lorasweep.provenance import files_fingerprint

    model = tmp_path / "my-model"
    shutil.copytree(tiny_model, model)
    (tmp_path / "local.yaml").write_text("model: {name_or_path: my-model, build_tiny: null}\n"
                                         "training: {max_steps: 2, evals: 1, logging_steps: 1}\n")
    target = "results/runs/full/seed0/metrics.json"
    args = (target, "--cores", 2, "--resources", "gpu=1", "--configfile", REPO / "config" / "tiny.yaml", "local.yaml")
    run_snakemake(*args, workdir=tmp_path)
    m = json.loads((tmp_path / target).read_text())
    assert m["model_files_sha256"] == files_fingerprint(model, None) and m["model_commit"] is None
    assert json.loads((tmp_path / ".snakemake" / "lorasweep-fingerprints.json").read_text())  # hashed once, kept
    for f in model.iterdir():
        later = f.stat().st_mtime + 60
        os.utime(f, (later, later))
    assert "Nothing to be done" in run_snakemake("-n", *args, workdir=tmp_path).stdout
    (model / "README.md").write_text("a model card")  # files from_pretrained does not read make no other model
    (model / "flax_model.msgpack").write_bytes(b"weights in a format lorasweep never loads")
    assert "Nothing to be done" in run_snakemake("-n", *args, workdir=tmp_path).stdout
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dropout": 0.05}))  # another model, same path
    planned = run_snakemake("-n", *args, workdir=tmp_path).stdout
    assert re.findall(r"^rule (\w+):", planned, re.M) == ["train"], planned[-2000:]
    assert "Params have changed since last execution" in planned and "model_files_sha256=" in planned


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"},
                                     # huggingface_hub reads TRANSFORMERS_OFFLINE where HF_HUB_OFFLINE is unset or empty
                                     {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "1"}])
def test_offline_a_hub_model_missing_from_the_cache_stops_before_any_job(tmp_path, tiny_model, offline):
    """HF_HUB_OFFLINE=1 and the default experiment's hub model not cached: every training job would fail after the
    data step; the workflow stops before any job, naming the key and the cache. Cached, it plans the sweep."""
    import shutil

    env = {**offline_env(tmp_path), **offline, "HF_HUB_CACHE": str(tmp_path / "hub")}
    args = ("-n", "--cores", 4, "--resources", "gpu=1", "--configfile", REPO / "config" / "config.yaml")
    proc = run_snakemake(*args, workdir=tmp_path, env=env, check=False)
    assert proc.returncode != 0
    setting = next(f"{k}={v}" for k, v in offline.items() if v)
    assert (f"model.name_or_path = 'facebook/opt-350m' is not in the local Hugging Face cache ({tmp_path / 'hub'}), "
            f"and {setting} forbids downloading it") in proc.stdout + proc.stderr
    repo = tmp_path / "hub" / "models--facebook--opt-350m"
    shutil.copytree(tiny_model, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert job_stats(run_snakemake(*args, workdir=tmp_path, env=env).stdout)["train"] == 5


def test_every_figure_file_is_asked_for_so_that_a_deleted_svg_is_drawn_again(tmp_path):
    """Snakemake reruns a job for the missing outputs something asks for: the report reads the PNGs, and `all`
    the SVGs, or a deleted SVG would never come back ("Nothing to be done")."""
    from lorasweep.plots import FIGURES

    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", workdir=tmp_path)
    wanted = proc.stdout.split("rule all:")[1].split("input:")[1].split("\n")[0]
    assert {f.strip() for f in wanted.split(",")} >= {f"reports/figures/{name}.svg" for name in FIGURES}


def test_leaving_out_the_gpu_resource_warns_when_training_jobs_could_overlap(tmp_path):
    """Without `--resources gpu=N` nothing keeps training jobs apart: with cores for two, two train at once and
    time each other. Snakemake starts anyway; lorasweep says so before the first job."""
    tiny = ("--configfile", REPO / "config" / "tiny.yaml")
    def console(*args):
        proc = run_snakemake("-n", *args, *tiny, workdir=tmp_path)
        return proc.stdout + proc.stderr

    assert "lorasweep: no --resources gpu=N given: with --cores 8 Snakemake may train 2 runs at once" in console(
        "--cores", 8)
    for ok in (("--cores", 8, "--resources", "gpu=1"), ("--cores", 4)):  # one at a time either way
        assert "lorasweep: no --resources" not in console(*ok)


def test_overrides_compose_with_a_second_configfile(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("methods:\n  lora:\n    ranks: [16]\n  qlora:\n    ranks: []\n")
    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", override,
                         workdir=tmp_path)
    stats = job_stats(proc.stdout)
    assert stats["train"] == 2 and stats["tiny_model"] == 1 and stats["tiny_dataset"] == 1
    assert "results/runs/lora-r16/seed0/metrics.json" in proc.stdout and "lora-r8/" not in proc.stdout


def test_seeds_and_adapter_variants_plan_one_job_per_run_and_seed(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("seeds: [3, 4, 5]\nmethods:\n  lora:\n    ranks: [8, {rank: 8, init: olora}, "
                        "{rank: 16, use_rslora: true, use_dora: true}]\n  qlora:\n    ranks: []\n")
    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", override,
                         workdir=tmp_path)
    stats = job_stats(proc.stdout)
    assert stats["train"] == 4 * 3  # full + three LoRA runs, three seeds each
    assert stats["merge"] == stats["verify"] == 3  # adapter stages on the first seed only
    for run in ("full", "lora-r8", "lora-r8-olora", "lora-r16-rslora-dora"):
        for seed in (3, 4, 5):
            assert f"results/runs/{run}/seed{seed}/metrics.json" in proc.stdout
    assert "results/runs/lora-r8-olora/seed3/verify.json" in proc.stdout
    assert "results/runs/lora-r8-olora/seed4/verify.json" not in proc.stdout


def test_the_workflow_runs_as_a_snakemake_module_of_another_project(tmp_path):
    """``module lorasweep: snakefile: ...`` + ``use rule * from lorasweep``, as snakemake-workflows recommends: the
    notebook and the scripts are found beside lorasweep's rules, not beside the other project's Snakefile."""
    import yaml
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "config" / "tiny.yaml").read_text()))
    (tmp_path / "lorasweep.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(
        'configfile: "lorasweep.yaml"\n\n'
        f'module lorasweep:\n    snakefile: "{REPO / "Snakefile"}"\n    config: config\n\n'
        "use rule * from lorasweep as lorasweep_*\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "lorasweep_all"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = job_stats(proc.stdout)
    assert stats["lorasweep_train"] == 5 and stats["lorasweep_report"] == 1
    assert str(REPO / "workflow" / "notebooks" / "summary.ipynb") in proc.stdout
    assert str(REPO / "workflow" / "scripts" / "collect.py") in proc.stdout


def second_checkout(tmp_path):
    """A copy of this checkout's files whose lorasweep writes where it was imported from to $LORASWEEP_IMPORTS."""
    checkout = tmp_path / "second checkout"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (checkout / f).parent.mkdir(parents=True, exist_ok=True)
        (checkout / f).write_bytes((REPO / f).read_bytes())
    with open(checkout / "lorasweep" / "__init__.py", "a") as f:
        f.write("\nimport os as _os\nwith open(_os.environ['LORASWEEP_IMPORTS'], 'a') as _f:\n"
                "    _f.write(__file__ + '\\n')\n")
    return checkout


def test_a_workflow_whose_jobs_would_import_another_checkouts_lorasweep_stops_before_any_job(tmp_path):
    """Snakemake puts the Snakefile's folder first on sys.path when it reads the workflow; its jobs' scripts find
    PYTHONPATH and the environment's site-packages first: with another checkout there (here: this one, on
    PYTHONPATH), the jobs ran that checkout's code while the workflow validated the config and tracked the code of
    its own. It now stops before any job, saying what to do; done so (the second checkout first on PYTHONPATH), the
    job imports the second checkout."""
    checkout = second_checkout(tmp_path)
    imports = tmp_path / "imports.txt"
    workdir = tmp_path / "work"
    workdir.mkdir()
    target = "results/tiny/code_alpaca_tiny.json"

    def snakemake(pythonpath):
        return subprocess.run([sys.executable, "-m", "snakemake", target, "-s", str(checkout / "Snakefile"), "--cores",
                               "1", "--configfile", str(checkout / "config" / "tiny.yaml")], cwd=workdir,
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(pythonpath), "LORASWEEP_IMPORTS": str(imports)})

    proc = snakemake(REPO)
    assert proc.returncode != 0 and not (workdir / target).exists()
    said = " ".join((proc.stdout + proc.stderr).split())
    assert (f"jobs would import lorasweep from {REPO / 'lorasweep'}, not from this workflow's checkout {checkout}"
            in said), said[-3000:]
    assert f"PYTHONPATH={str(checkout)!r} snakemake" in said and f"pip install -e {str(checkout)!r}" in said
    imports.unlink()
    proc = snakemake(checkout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (workdir / target).is_file()
    # the workflow and its job each imported the package, both from the second checkout
    assert imports.read_text().splitlines() == [str(checkout / "lorasweep" / "__init__.py")] * 2


def test_jobs_find_the_workflows_checkout_where_lorasweep_is_not_installed(tmp_path):
    """Snakemake appends its own sys.path, the Snakefile's folder included, to every script job's: an environment
    with lorasweep's dependencies and no lorasweep (or one installed editable from another checkout, whose import
    hook comes after that path) runs the Snakefile's checkout in its jobs. The check refused it ('lorasweep is not
    installed ...: every job would fail at its import'), as it refused a second checkout beside an editable install
    of the first, which the README sets up."""
    import sysconfig

    checkout = second_checkout(tmp_path)
    imports = tmp_path / "imports.txt"
    venv = tmp_path / "venv"  # this environment's packages, through a path, without its lorasweep
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "dependencies.pth").write_text(
        "\n".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))) + "\n")
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if subprocess.run([python, "-c", "import importlib.util as u, snakemake; assert not u.find_spec('lorasweep')"],
                      cwd=tmp_path, env=env).returncode:
        pytest.skip("lorasweep is installed in site-packages (not editable): no environment without it to make")
    workdir = tmp_path / "work"
    workdir.mkdir()
    target = "results/tiny/code_alpaca_tiny.json"
    proc = subprocess.run([python, "-m", "snakemake", target, "-s", str(checkout / "Snakefile"), "--cores", "1",
                           "--configfile", str(checkout / "config" / "tiny.yaml")], cwd=workdir, capture_output=True,
                          text=True, env={**env, "LORASWEEP_IMPORTS": str(imports)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (workdir / target).is_file()
    # the workflow and its job each imported the package, both from the checkout
    assert [os.path.realpath(f) for f in imports.read_text().splitlines()] == \
        [str(checkout / "lorasweep" / "__init__.py")] * 2


def test_a_job_run_outside_snakemake_with_another_checkouts_lorasweep_stops(tmp_path):
    """python -m lorasweep.job runs the job in its own process, with the lorasweep it imported before reading the
    workflow: here another checkout's, found in the folder it runs in (its jobs, as Snakemake would run them, would
    find the Snakefile's). It stops, saying how to run it."""
    checkout = second_checkout(tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "lorasweep").symlink_to(REPO / "lorasweep")
    target = "results/tiny/code_alpaca_tiny.json"
    proc = subprocess.run([sys.executable, "-m", "lorasweep.job", target, "--snakefile", str(checkout / "Snakefile"),
                           "--cores", "1", "--configfile", str(checkout / "config" / "tiny.yaml")], cwd=workdir,
                          capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                               "LORASWEEP_IMPORTS": str(tmp_path / "imports.txt")})
    assert proc.returncode != 0 and not (workdir / target).exists()
    said = " ".join(proc.stderr.split())
    assert (f"this process imported lorasweep from {workdir / 'lorasweep'}, not from the workflow's checkout "
            f"{checkout}" in said and f"PYTHONPATH={str(checkout)!r}" in said), said[-3000:]


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The whole tiny preset, run once as a user would."""
    workdir = tmp_path_factory.mktemp("sweep")
    (workdir / "seeds.yaml").write_text("seeds: [0, 1]\n")  # two replicates: the report shows their spread
    proc = run_snakemake("--cores", 2, "--resources", "gpu=1", "--configfile", REPO / "config" / "tiny.yaml",
                         workdir / "seeds.yaml", workdir=workdir)
    return workdir, proc


SWEEP_ARGS = ("--cores", 2, "--resources", "gpu=1", "--configfile", REPO / "config" / "tiny.yaml", "seeds.yaml")


@pytest.mark.slow
def test_tiny_sweep_produces_metrics_figures_and_report(tiny_sweep):
    workdir, _ = tiny_sweep
    runs = ["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"]
    df = pd.read_csv(workdir / "results" / "metrics.csv")
    assert list(df["run"]) == [r for r in runs for _ in (0, 1)] and list(df["seed"]) == [0, 1] * len(runs)
    for col in ("train_loss", "eval_loss", "base_eval_loss", "train_runtime_s", "train_samples_per_s",
                "peak_rss_bytes", "trainable_params", "total_params"):
        assert df[col].map(math.isfinite).all(), col
    assert (df["eval_loss"] < df["base_eval_loss"]).all()  # every run's loss falls
    assert (df.loc[df["run"] == "qlora-r8", "quantized_4bit_layers"] > 0).all()
    for run in runs:
        for seed in (0, 1):
            assert (workdir / "logs" / "train" / run / f"seed{seed}.log").stat().st_size > 0
            bench = pd.read_csv(workdir / "results" / "benchmarks" / "train" / run / f"seed{seed}.tsv", sep="\t")
            assert bench["s"].iloc[0] > 0
            m = json.loads((workdir / "results" / "runs" / run / f"seed{seed}" / "metrics.json").read_text())
            assert (m["run"], m["seed"]) == (run, seed)
        # replicates differ (adapter init, data order), but not by more than training noise
        e0, e1 = df.loc[df["run"] == run, "eval_loss"]
        assert e0 != e1 and abs(e0 - e1) < 0.5
    md = (workdir / "reports" / "summary.md").read_text()
    for heading in ("## Findings", "## Setup", "## Results", "## Figures", "## Memory: measured and predicted",
                    "## Beside the published write-ups"):
        assert heading in md
    assert "**Lowest eval loss: `full`**" in md  # on a random-init tiny model only full fine-tuning learns much
    assert "**The model's weights are random**" in md.split("## Findings")[0]  # model.build_tiny, the rule's param
    assert "each trained with 2 seeds (0,1" in md and "one standard deviation across seeds" in md
    assert re.search(r"\| full +\| [\d.]+ ± [\d.]+ +\| [\d.]+ ± [\d.]+", md)  # train / eval loss: mean ± sd
    assert "examples and 2 seeds each" in md  # intervals cover seed-to-seed variation
    ev = pd.read_csv(workdir / "results" / "eval_losses.csv")
    assert sorted(set(ev["run"])) == sorted(runs) and (ev["tokens"] > 0).all() and set(ev["seed"]) == {0, 1}
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 6
    for link in links:
        assert (workdir / "reports" / link).is_file(), link
    assert "```python" not in md and "Traceback" not in md and "import " not in md
    assert (workdir / "reports" / "summary.ipynb").is_file()
    # the rerun commands are this sweep's (its config files; an existing run), targets before the options
    # that read every value after them
    # (and, run from a directory without it, the Snakefile)
    configs = (f"--snakefile {os.path.relpath(REPO / 'Snakefile', workdir)} "
               f"--configfile {os.path.relpath(REPO / 'config' / 'tiny.yaml', workdir)} seeds.yaml")
    assert f"snakemake reports/summary.md --cores 4 --resources gpu=1 {configs}" in md
    assert (f"snakemake --forcerun results/runs/lora-r8/seed0/metrics.json results/runs/lora-r8/seed1/metrics.json "
            f"--cores 4 --resources gpu=1 {configs}") in md  # every seed of the run


@pytest.mark.slow
def test_every_adapter_is_merged_verified_and_switched(tiny_sweep, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorasweep.adapters import AdapterMismatch, MergeMismatch, verify_run
    from lorasweep.config import run_spec, validate_config

    workdir, _ = tiny_sweep
    runs = workdir / "results" / "runs"
    for run in ("lora-r8", "lora-r128", "lora-r256", "qlora-r8"):
        v = json.loads((runs / run / "seed0" / "verify.json").read_text())
        assert v["within_tolerance"] and v["greedy_identical"] and v["adapter_as_trained"], v
        assert v["eval_loss_merged"] == pytest.approx(v["eval_loss_adapter"], abs=1e-4)
        model = AutoModelForCausalLM.from_pretrained(runs / run / "seed0" / "merged")  # plain transformers, no PEFT
        assert not any("lora" in n for n, _ in model.named_parameters())
        assert (runs / run / "seed0" / "merged" / "tokenizer.json").is_file()
        assert not (runs / run / "seed1" / "merged").exists()  # adapter stages: first seed only
    assert not (runs / "full" / "seed0" / "merged").exists()
    sw = json.loads((workdir / "results" / "switch.json").read_text())
    assert [a["adapter"] for a in sw["adapters"]] == ["lora-r8", "lora-r128", "lora-r256"]
    assert sw["unload_restores_base_exactly"] and all(a["max_abs_logit_diff_vs_base"] > 0 for a in sw["adapters"])
    samples = json.loads((workdir / "results" / "samples.json").read_text())
    assert len(samples) == 3 and set(samples[0]["completions"]) == {
        "base (untrained)", "full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"}
    md = (workdir / "reports" / "summary.md").read_text()
    assert "## Adapters after training: merge, verify, switch" in md and "### Samples" in md

    # a wrong merge is caught: lora-r8's adapter against lora-r256's merged model
    cfg = validate_config(__import__("yaml").safe_load((REPO / "config" / "tiny.yaml").read_text()))
    spec = run_spec(cfg, "lora-r8")
    spec["model"]["name_or_path"] = str(workdir / spec["model"]["name_or_path"])
    with pytest.raises(MergeMismatch, match="do not deploy this merge"):
        verify_run(spec, runs / "lora-r8" / "seed0" / "model", runs / "lora-r256" / "seed0" / "merged",
                   workdir / "results" / "data" / "eval.jsonl", tmp_path / "verify.json")
    # another run's adapter in lora-r8's place, merged: the merge matches it, but it is not what lora-r8 trained
    with pytest.raises(AdapterMismatch, match="lora-r8: base .* does not compute what the model that trained"):
        verify_run(spec, runs / "lora-r128" / "seed0" / "model", runs / "lora-r128" / "seed0" / "merged",
                   workdir / "results" / "data" / "eval.jsonl", tmp_path / "verify.json",
                   trained_losses=runs / "lora-r8" / "seed0" / "eval_losses.json",
                   trained_metrics=runs / "lora-r8" / "seed0" / "metrics.json")


@pytest.mark.slow
def test_snakemake_html_report_holds_the_figures(tiny_sweep):
    workdir, _ = tiny_sweep
    run_snakemake(*SWEEP_ARGS, "--report", "reports/report.html", workdir=workdir)
    html = (workdir / "reports" / "report.html").read_text()
    for name in ("loss_curves.png", "tradeoff.png", "memory.png", "metrics.csv"):
        assert name in html, name


@pytest.mark.slow
def test_an_update_of_the_report_code_redoes_the_report_and_retrains_nothing(tiny_sweep, tmp_path):
    """The tables, figures and report list the package's code as inputs: an update that changes what the report
    says redoes them ("Nothing to be done" would leave the old report looking current); training does not rerun."""
    import shutil

    workdir, _ = tiny_sweep
    repo = tmp_path / "repo"  # a checkout of its own, whose code the test can change (Snakemake imports the
    repo.mkdir()
    for part in ("Snakefile", "workflow", "lorasweep", "config", "profiles", "envs"):  # package beside its Snakefile)
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        copy(REPO / part, repo / part, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                          else {}))
    args = ["-s", repo / "Snakefile", *SWEEP_ARGS]
    env = {"PYTHONPATH": str(repo)}  # its jobs import its package (else the workflow stops: another is installed)
    moved = run_snakemake(*args, workdir=workdir, env=env)  # its code's paths are other inputs: the cheap rules rerun
    assert "rule report:" in moved.stdout + moved.stderr and "rule train:" not in moved.stdout + moved.stderr
    assert "Nothing to be done" in run_snakemake(*args, "-n", workdir=workdir, env=env).stdout
    findings = repo / "lorasweep" / "findings.py"
    findings.write_text(findings.read_text() + "\n# an update\n")
    planned = run_snakemake(*args, "-n", workdir=workdir, env=env).stdout
    assert sorted(set(re.findall(r"^rule (\w+):", planned, re.M))) == ["all", "collect", "plot", "report"], planned[-3000:]
    assert "Updated input files: " in planned and "lorasweep/findings.py" in planned
    run_snakemake(*SWEEP_ARGS, workdir=workdir)  # back to this checkout, for the other tests of the sweep


@pytest.mark.slow
def test_the_datasets_own_field_names_prepare_the_data_again(tiny_sweep):
    """dataset.fields is a param of the data step only when set: a sweep prepared before it existed (or without it)
    stays up to date, and setting it prepares the data again, the dry run saying why."""
    workdir, _ = tiny_sweep
    assert "Nothing to be done" in run_snakemake(*SWEEP_ARGS, "-n", workdir=workdir).stdout
    fields = workdir / "fields.yaml"
    fields.write_text("dataset:\n  fields: {instruction: instruction, output: output}\n")
    planned = run_snakemake(*SWEEP_ARGS, fields, "-n", workdir=workdir).stdout
    assert re.search(r"^rule prepare_data:\n(?:    .*\n)*?    reason: Params have changed .*'instruction': "
                     r"'instruction', 'output': 'output'", planned, re.M), planned[-3000:]


@pytest.mark.slow
def test_rerunning_one_rank_retrains_only_that_run(tiny_sweep):
    workdir, _ = tiny_sweep
    args = SWEEP_ARGS
    assert "Nothing to be done" in run_snakemake(*args, "-n", workdir=workdir).stdout
    # how a run is executed (checkpoint interval, threads, compilation, padding, GPU sharing) is not what it
    # computes, and a hub dataset's split means nothing for a local file: no retraining; only the report is
    # redone, since its rerun commands name the config files
    ops = workdir / "ops.yaml"
    ops.write_text("training:\n  checkpoint_steps: 7\n  checkpoint_min_interval_s: 5\n  keep_checkpoints: true\n"
                   "  threads: 1\n"
                   "  torch_compile: true\n  torch_compile_regional: true\n  pad_to_multiple_of: 64\n  jobs_per_gpu: 2\n"
                   "  eval_batch_size: 4\n"  # README's advice after an evaluation runs out of memory
                   "dataset:\n  split: validation\n")
    planned = run_snakemake("-n", *args, ops, workdir=workdir).stdout
    assert re.findall(r"^rule (\w+):", planned, re.M) == ["report", "all"], planned[-3000:]
    # a checkout, a pull or a touch of a training script retrains nothing (the workflow profile's rerun triggers)
    script = REPO / "workflow" / "scripts" / "train.py"
    stamp = script.stat()
    try:
        os.utime(script, (stamp.st_atime + 3600, stamp.st_mtime + 3600))
        assert "Nothing to be done" in run_snakemake(*args, "-n", workdir=workdir).stdout
    finally:
        os.utime(script, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    # a setting of one method retrains that method's runs, every seed, and nothing else
    lr = workdir / "lr.yaml"
    lr.write_text("methods:\n  lora:\n    learning_rate: 0.00123\n")
    planned = run_snakemake("-n", *args, lr, workdir=workdir).stdout
    trained = sorted(re.findall(r"^rule train:\n(?:.*\n)*?\s+wildcards: run=([\w-]+), seed=(\d+)", planned, re.M))
    # (QLoRA has a learning rate of its own: methods.qlora.learning_rate)
    assert trained == sorted((r, s) for r in ("lora-r8", "lora-r128", "lora-r256") for s in "01"), planned[-3000:]
    # the reason names the setting that changed, before and now, and no other
    reasons = re.findall(r"^rule train:\n(?:.*\n)*?\s+reason: (.*)", planned, re.M)
    assert len(reasons) == 6 and all("before: 'learning_rate=0.005' now: 'learning_rate=0.00123'" in r
                                     and "training." not in r and len(r) < 200 for r in reasons), reasons[:1]
    metrics = {(r, s): (workdir / "results" / "runs" / r / f"seed{s}" / "metrics.json")
               for r in ("full", "lora-r8", "lora-r128") for s in (0, 1)}
    before = {k: p.stat().st_mtime_ns for k, p in metrics.items()}
    report_before = (workdir / "reports" / "summary.md").stat().st_mtime_ns
    proc = run_snakemake(*args, "--forcerun", "results/runs/lora-r128/seed1/metrics.json", workdir=workdir)
    log = proc.stdout + proc.stderr
    assert len(re.findall(r"rule train:", log)) == 1 and "wildcards: run=lora-r128, seed=1" in log
    after = {k: p.stat().st_mtime_ns for k, p in metrics.items()}
    assert after[("lora-r128", 1)] > before[("lora-r128", 1)]
    assert all(after[k] == before[k] for k in metrics if k != ("lora-r128", 1))
    assert (workdir / "reports" / "summary.md").stat().st_mtime_ns > report_before


def test_every_jobs_log_ends_saying_what_it_did_without_the_libraries_expected_noise(tmp_path):
    """A log a user opens after the sweep: its last line says what the job did; the warnings every healthy job
    prints (bitsandbytes' optional CPU kernel, PEFT's use of a renamed transformers property) and progress bars are
    left out, so that a warning in a log means something."""
    import yaml

    override = tmp_path / "one-run.yaml"
    override.write_text(yaml.safe_dump({"methods": {"full": {"enabled": False}, "lora": {"ranks": [8]},
                                                    "qlora": {"ranks": []}},
                                        "training": {"max_steps": 10, "evals": 1}}))
    run_snakemake("results/switch.json", "results/samples.json", "results/runs/lora-r8/seed0/merged", "--cores", 2,
                  "--resources", "gpu=1", "--configfile", REPO / "config" / "tiny.yaml", override, workdir=tmp_path)
    logs = {str(p.relative_to(tmp_path / "logs")): p.read_text() for p in (tmp_path / "logs").rglob("*.log")}
    assert set(logs) == {"tiny_dataset.log", "prepare_data.log", "tiny_model.log", "train/lora-r8/seed0.log",
                         "merge/lora-r8/seed0.log", "switch.log", "samples.log"}
    for name, text in logs.items():
        assert re.fullmatch(r"\S+ \S+ INFO lorasweep[.\w]*: .+\n", text.splitlines(True)[-1]), (name, text)
        for noise in ("gemm_4bit_forward", "is_gradient_checkpointing", "it/s]"):
            assert noise not in text, (name, noise, text)
    assert "greedy completions" in logs["samples.log"] and "bit for bit" in logs["switch.log"]
