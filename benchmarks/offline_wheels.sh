#!/usr/bin/env bash
# Wheels for an offline GPU machine whose Python already has a CUDA build of torch (and the common scientific
# stack), to run benchmarks/gpu_checks.sh there; downloaded here, where the package registry is reachable:
#
#   bash benchmarks/offline_wheels.sh DIR [PYTHON_VERSION]        # default 3.12; ~55 MB
#
# DIR gets lorasweep's training pins from pyproject.toml (transformers, trl, peft, datasets, tokenizers,
# bitsandbytes with only its CUDA ${BNB_CUDA:-130} library, and what those need beyond such an image), and
# DIR/sweep snakemake with its dependencies, less the packages listed in HAVE (the machine's own), each at the
# version envs/constraints.txt pins (the stack the tests passed with). On the
# machine, in a copy of this checkout with DIR beside it:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl DIR/sweep/*.whl
#   export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
#   bash benchmarks/gpu_checks.sh code_alpaca_2k.json OUT
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1; py=${2:-3.12}; cuda=${BNB_CUDA:-130}
# packages such an image already has (one pip list of a PyTorch CUDA image); their wheels are not needed
HAVE=${HAVE:-"attrs certifi charset_normalizer idna jinja2 markupsafe packaging psutil pyyaml requests tabulate
typing_extensions urllib3 wrapt"}
mkdir -p "$dir/sweep"
binary=(--only-binary=:all: --python-version "$py" --implementation cp --platform any)
for n in 17 24 27 28; do binary+=(--platform "manylinux_2_${n}_x86_64"); done
binary+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

pin() { python3 -c "import re, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
print(next(d for d in deps if re.split('[=<>]', d)[0] == sys.argv[1]))" "$1"; }
training=()
for name in transformers trl peft datasets tokenizers bitsandbytes jsonschema; do training+=("$(pin $name)"); done
# what datasets and jsonschema need beyond such an image
python3 -m pip download -q --no-deps "${binary[@]}" -c envs/constraints.txt -d "$dir" "${training[@]}" \
    "dill<0.4.2" "multiprocess<0.70.20" referencing jsonschema-specifications rpds-py
# bitsandbytes ships a library per CUDA version: keep the one the machine's torch was built for
bnb=$(ls "$dir"/bitsandbytes-*.whl)
libs=$(python3 -c "import sys, zipfile; print(' '.join(n for n in zipfile.ZipFile(sys.argv[1]).namelist()
    if '/libbitsandbytes_cuda' in n and not n.endswith('_cuda$cuda.so')))" "$bnb")
[ -n "$libs" ] && zip -q -d "$bnb" $libs

# snakemake and its dependencies; a dependency published only as source is built into a wheel here
sm=$(pin snakemake)
for _ in 1 2 3 4 5 6; do
    if out=$(python3 -m pip download "${binary[@]}" -c envs/constraints.txt --find-links "$dir/sweep" -d "$dir/sweep" "$sm" 2>&1); then break; fi
    # pip names a package published only as source "requirement X", or, pinned by the constraints, "(constraint) X=="
    missing=$(grep -o -e "requirement [A-Za-z0-9_.-]*" -e "(constraint) [A-Za-z0-9_.-]*" <<<"$out" | head -1 | cut -d' ' -f2)
    [ -n "$missing" ] || { echo "$out" >&2; exit 1; }
    python3 -m pip wheel -q --no-deps -c envs/constraints.txt -w "$dir/sweep" "$missing"
done
for name in $HAVE; do rm -f "$dir/sweep/${name}"-[0-9]*.whl; done
for w in "$dir"/*.whl; do  # one copy of each: two versions of a package stop pip's install
    base=$(basename "$w" | cut -d- -f1); rm -f "$dir/sweep/$base"-[0-9]*.whl
done
du -sh "$dir"
