# Shared helpers: config validation, run names, per-run parameters, input functions.

import functools
import re
import time
from pathlib import Path

from snakemake.common import get_snakemake_searchpaths
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

import lorasweep

# this process's lorasweep, before anything is taken from it: Snakemake imports it from the Snakefile's folder, first
# on sys.path, but python -m lorasweep.job imported one (found from where it ran) before it read the workflow
_CHECKOUT = Path(str(workflow.current_basedir)).parents[1]  # the one holding workflow/rules/common.smk
if Path(lorasweep.__file__).resolve() != (_CHECKOUT / "lorasweep" / "__init__.py").resolve():
    raise WorkflowError(f"this process imported lorasweep from {Path(lorasweep.__file__).parent}, not from the "
                        f"workflow's checkout {_CHECKOUT} (python -m lorasweep.job imports the one it finds first): "
                        f"run it with PYTHONPATH={str(_CHECKOUT)!r}")
from lorasweep.config import (ConfigError, Unrecorded, check_config_files, check_dataset_file, check_jobs_import,
                              check_model_path, check_offline_model_cached, flat_settings, run_names, run_spec, seeds,
                              setting_names, setting_param, validate_config)
from lorasweep.data import fingerprint, is_local_source
from lorasweep.provenance import files_fingerprint
from lorasweep.resume import failures_since

WORKFLOW_START = time.time()  # failures_since: the training jobs that failed in this invocation
TINY_DATASET = "results/tiny/code_alpaca_tiny.json"  # the tiny_dataset rule's output (config/tiny.yaml's source)

try:
    check_config_files(workflow.configfiles)  # config/config.yaml and every --configfile: no key written twice
    validate_config(config)  # fills defaults in place; every error names its key and what is allowed
    check_dataset_file(config, built=(TINY_DATASET,))
    check_model_path(config)
    check_offline_model_cached(config)
except ConfigError as e:
    raise WorkflowError(str(e)) from None

TRAIN_THREADS = 4  # each training job's threads (the train rule's)
_cores = getattr(workflow.global_resources.get("_cores"), "value", workflow.global_resources.get("_cores"))
if workflow.is_main_process and "gpu" not in workflow.global_resources and isinstance(_cores, int) \
        and _cores >= 2 * TRAIN_THREADS:
    logger.warning(
        f"lorasweep: no --resources gpu=N given: with --cores {_cores} Snakemake may train "
        f"{_cores // TRAIN_THREADS} runs at once, and their timings then measure each other (the report flags them "
        "as timed on a busy machine). Add --resources gpu=1, as in the README's commands, for one training job at "
        "a time (gpu=N: N at once, one per GPU).")

RUNS = run_names(config)
SEEDS = seeds(config)  # training seeds; every run is trained once per seed
FIRST_SEED = SEEDS[0]  # the replicate the adapter stages (merge, verify, switch, samples) use
ENV = "../../envs/lorasweep.yaml"
# its post-deploy script installs this checkout into the environment (--sdm conda); Snakemake runs a copy of the script
# from the environments' folder (.snakemake/conda/<hash>.post-deploy.sh) in this process's environment, so the copy
# finds the checkout here, not from its own place
os.environ.update(LORASWEEP_CHECKOUT=str(_CHECKOUT))  # set, not read: no envvars directive (snakemake --lint)


def near(path):
    """``path`` relative to the working directory when inside it, else absolute: a project folder moved elsewhere
    keeps the same inputs (absolute first: the same input however --snakefile was spelled)."""
    path = os.path.abspath(path)
    return path if os.path.relpath(path).startswith("..") else os.path.relpath(path)


# the workflow/ folder, from this file's own place (_CHECKOUT's): workflow.basedir is the main Snakefile's folder,
# which is another project's when lorasweep is used as a Snakemake module (module ...: snakefile: ...)
WORKFLOW_DIR = _CHECKOUT / "workflow"
NOTEBOOK = near(WORKFLOW_DIR / "notebooks" / "summary.ipynb")

# the jobs must import lorasweep from this checkout, as the workflow did: stop before any job, saying what to do, if
# they would find another first (on PYTHONPATH, a stale non-editable install); a script job's sys.path ends with
# Snakemake's search paths (this process's sys.path, this checkout included); a conda environment installs this
# checkout itself (envs/lorasweep.post-deploy.sh)
if not workflow.deployment_settings.deployment_method:
    try:
        check_jobs_import(_CHECKOUT, search_path=get_snakemake_searchpaths())
    except ConfigError as e:
        raise WorkflowError(str(e)) from None


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS),
    seed=r"\d+",


@functools.cache
def _settings(run, seed):
    """Only the settings that affect this run: changing another run's settings does not retrain it."""
    return flat_settings(run_spec(config, run, seed))


def _setting(name):
    return lambda wildcards: setting_param(name, _settings(wildcards.run, int(wildcards.seed))[name])


# A run's settings as Snakemake params, one "name=value" each (params: **RUN_SETTINGS): a changed setting reruns
# exactly the runs it belongs to, and the rerun reason shows that setting before and now. The scripts compute the
# run's spec from the config and the wildcards (lorasweep.config.run_spec), as these do.
RUN_SETTINGS = {"setting_{}".format(name.replace(".", "_")): _setting(name) for name in setting_names()}


def run_files(name, runs=None, seeds=None):
    """``results/runs/<run>/seed<seed>/<name>`` for every run and seed (by default all of them)."""
    return expand(f"results/runs/{{run}}/seed{{seed}}/{name}", run=RUNS if runs is None else runs,
                  seed=SEEDS if seeds is None else seeds)


def get_model_input(wildcards):
    """The locally built tiny model is a workflow output; a hub id or existing local model is not (a local model is
    known by its content: MODEL_FILES_SHA256)."""
    return [config["model"]["name_or_path"]] if config["model"]["build_tiny"] else []


# the content of a local model folder (the files from_pretrained reads) as the train rule's param: new weights or a
# new tokenizer under the same path retrain every run, a copy or a touch retrains none. A hub model is named by
# model.revision (pin a commit); each run records the commit and the files' fingerprint it loaded.
_model = str(config["model"]["name_or_path"])
os.makedirs(".snakemake", exist_ok=True)  # the fingerprints' cache lives there, from a fresh folder's first run
MODEL_FILES_SHA256 = (files_fingerprint(_model) if not config["model"]["build_tiny"] and os.path.isdir(_model)
                      else None)


def get_dataset_input(wildcards):
    """A local dataset file, by its content (DATASET_SHA256), not its time stamp: a copy, a checkout or a touch of
    a file over 1 MB (Snakemake compares the content of smaller ones itself) would otherwise retrain every run.
    The tiny preset's, which a rule builds, stays an ordinary input."""
    source = config["dataset"]["source"]
    if not is_local_source(source):
        return []
    return [source] if source == TINY_DATASET else [ancient(source)]


# the content of a local dataset file as prepare_data's param (see get_dataset_input); None for a hub id or a file
# a rule builds
_source = str(config["dataset"]["source"])
DATASET_SHA256 = fingerprint(_source) if is_local_source(_source) and _source != TINY_DATASET else None

# The code of the cheap rules that turn results into tables, figures and the report, as their inputs: an update that
# changes what the report says reruns them (the workflow profile turns Snakemake's code trigger off, so that an
# edit of a training script does not retrain every run; Snakemake compares the content of files under 1 MB, so a
# touch reruns nothing). Training and the adapter stages rerun only on their settings and inputs, or --forcerun.
PACKAGE_CODE = sorted(near(f) for f in Path(lorasweep.__file__).parent.glob("*.py"))


def code_inputs(script):
    """The package's modules and this rule's script (``workflow/scripts/<script>``)."""
    return [*PACKAGE_CODE, near(WORKFLOW_DIR / "scripts" / script)]


def report_failures():
    """On a failed workflow, the training runs that failed in it, each with its error and log (onerror)."""
    text = failures_since("results/runs", WORKFLOW_START - 1)
    if text:
        logger.error(text)
