# Shared helpers: config validation, run names, per-run parameters, input functions.

import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from lorasweep.config import ConfigError, check_dataset_file, run_names, run_spec, seeds, validate_config
from lorasweep.data import is_local_source

TINY_DATASET = "results/tiny/code_alpaca_tiny.json"  # the tiny_dataset rule's output (config/tiny.yaml's source)

try:
    validate_config(config)  # fills defaults in place; every error names its key and what is allowed
    check_dataset_file(config, built=(TINY_DATASET,))
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
# relative to the working directory when inside it: a project folder moved elsewhere keeps the same report input
# (absolute first: the same input however --snakefile was spelled)
NOTEBOOK = os.path.abspath(Path(workflow.basedir) / "workflow" / "notebooks" / "summary.ipynb")
if not os.path.relpath(NOTEBOOK).startswith(".."):
    NOTEBOOK = os.path.relpath(NOTEBOOK)


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS),
    seed=r"\d+",


def get_run_spec(wildcards):
    """Only the settings that affect this run: changing another run's settings does not retrain it."""
    return run_spec(config, wildcards.run, int(wildcards.seed))


def run_files(name, runs=None, seeds=None):
    """``results/runs/<run>/seed<seed>/<name>`` for every run and seed (by default all of them)."""
    return expand(f"results/runs/{{run}}/seed{{seed}}/{name}", run=RUNS if runs is None else runs,
                  seed=SEEDS if seeds is None else seeds)


def get_model_input(wildcards):
    """The locally built tiny model is a workflow output; a hub id or existing local model is not."""
    return [config["model"]["name_or_path"]] if config["model"]["build_tiny"] else []


def get_dataset_input(wildcards):
    source = config["dataset"]["source"]
    return [source] if is_local_source(source) else []
