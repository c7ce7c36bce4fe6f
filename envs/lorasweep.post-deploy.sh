#!/usr/bin/env bash
# Snakemake runs this in the conda environment of lorasweep.yaml once it is built (--sdm conda): it installs
# lorasweep itself, editable, from the workflow's checkout, so that the rules' scripts import it (the
# environment file can name only the dependencies: Snakemake builds it from a copy under .snakemake/conda).
# Snakemake runs a copy of this file too, from .snakemake/conda (or --conda-prefix), not this one: the workflow names
# its checkout in LORASWEEP_CHECKOUT (workflow/rules/common.smk); run by hand, this file's own checkout.
set -euo pipefail
checkout=${LORASWEEP_CHECKOUT:-$(cd "$(dirname "$0")/.." && pwd)}
python -m pip install --quiet --no-deps -e "$checkout"
