#!/usr/bin/env bash
# Rewrites envs/constraints.txt from a fresh install of this checkout (run it after changing a pin in
# pyproject.toml, then run the tests): every package `pip install -e ".[test]"` installs, at its version.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3.11 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -e ".[test]"
{
    sed -n '/^#/p' envs/constraints.txt
    # the CPU build's local label (+cpu) would refuse the CUDA build of the same release; --all: setuptools too,
    # which torch requires (pip freeze leaves it out), not pip itself, which nothing requires
    "$venv/bin/pip" freeze --all --exclude-editable | grep -v '^pip==' \
        | sed 's/^torch==\([0-9.]*\)+[a-z0-9]*$/torch==\1/'
} > envs/constraints.txt.new
mv envs/constraints.txt.new envs/constraints.txt
echo "envs/constraints.txt: $(grep -vc '^#' envs/constraints.txt) packages"
