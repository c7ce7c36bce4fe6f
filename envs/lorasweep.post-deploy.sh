#!/usr/bin/env bash
# Snakemake runs this in the conda environment of lorasweep.yaml once it is built (--sdm conda): it installs
# lorasweep itself, editable, from the checkout this file belongs to, so that the rules' scripts import it (the
# environment file can name only the dependencies: Snakemake builds it from a copy under .snakemake/conda).
set -euo pipefail
python -m pip install --quiet --no-deps -e "$(cd "$(dirname "$0")/.." && pwd)"
