# Shared helpers: config validation, run names, per-run parameters, input functions.

import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from lorasweep.config import ConfigError, run_names, run_spec, validate_config
from lorasweep.data import is_local_source

try:
    validate_config(config)  # fills defaults in place; every error names its key and what is allowed
except ConfigError as e:
    raise WorkflowError(str(e)) from None

RUNS = run_names(config)
ENV = "../../envs/lorasweep.yaml"
NOTEBOOK = str(Path(workflow.basedir) / "workflow" / "notebooks" / "summary.ipynb")


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS),


def get_run_spec(wildcards):
    """Only the settings that affect this run: changing another run's settings does not retrain it."""
    return run_spec(config, wildcards.run)


def get_model_input(wildcards):
    """The locally built tiny model is a workflow output; a hub id or existing local model is not."""
    return [config["model"]["name_or_path"]] if config["model"]["build_tiny"] else []


def get_dataset_input(wildcards):
    source = config["dataset"]["source"]
    return [source] if is_local_source(source) else []
