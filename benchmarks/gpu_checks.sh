#!/usr/bin/env bash
# The speed checks that only a GPU can answer, in one go, each under its own time cap, for a short lease:
#
#   bash benchmarks/gpu_checks.sh DATA OUT [STEPS]        # DATA: CodeAlpaca .json; OUT: a folder for results
#
# opt-350m's shape (random weights), one epoch of the data by default (240 steps of 8 on the 2k sample):
#   1. full fine-tuning, eager                       (the baseline of this machine)
#   2. full, torch.compile regional (decoder layers compiled once), pad_to_multiple_of 64
#   3. full, the same with CUDA graphs (torch_compile: reduce-overhead)
#   4. lora-r8, eager, and 5. lora-r8 with the better of 2-3 if it beat eager over the second half of its run
#   6. the five-run sweep of the workflow on DATA (default experiment: 3 epochs) with training.jobs_per_gpu 5,
#      its wall clock and each run's rate (needs snakemake)
# Every benchmark line (tokens/s over the run and its second half, MFU, memory) goes to OUT/summary.txt;
# per-check logs and JSON beside it. A check over its cap is reported as such and the next one runs.
# CHECKS="bench" or "sweep" runs one part (default both: over ten minutes at the caps); CAP_SCALE=0.5 halves
# every cap (caps: eager 90 s, compiled 200 s, sweep 480 s); DEVICE=cpu SHAPE=tiny and STEPS 20 try the
# script itself on a CPU (the sweep then stops each run after STEPS steps).
set -uo pipefail
cd "$(dirname "$0")/.."
data=$(realpath "$1"); out=$(mkdir -p "$2" && realpath "$2"); steps=${3:-${STEPS:-240}}
device=${DEVICE:-cuda}; shape=${SHAPE:-opt-350m}; scale=${CAP_SCALE:-1}; checks=${CHECKS:-bench sweep}
summary="$out/summary.txt"
echo "gpu_checks $(date -u +%FT%TZ) device=$device shape=$shape steps=$steps data=$data" | tee "$summary"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$summary"

cap() { python3 -c "print(max(10, int($1 * $scale)))"; }

bench() {  # bench NAME CAP_S ARGS...: one throughput run of lorasweep's recipe
    local name=$1 limit; limit=$(cap "$2"); shift 2
    local t0=$SECONDS
    timeout "$limit" python3 benchmarks/throughput.py --data "$data" --shape "$shape" --device "$device" \
        --recipes lorasweep --repeats 1 --steps "$steps" --json "$out/$name.json" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        echo "$name ($((SECONDS - t0)) s in all): $(grep -h '\[1/1\]' "$out/$name.log" | sed 's/^ *//')" | tee -a "$summary"
        grep -h "MFU\|peak CUDA" "$out/$name.log" | sed "s/^/    /" | tee -a "$summary"
    elif [ $rc -eq 124 ]; then
        echo "$name: over its cap of $limit s; last progress: $(grep -h 'step ' "$out/$name.log" | tail -1)" | tee -a "$summary"
    else
        echo "$name: failed (exit $rc): $(tail -1 "$out/$name.log")" | tee -a "$summary"
    fi
    return $rc
}

compiled=(--training torch_compile=true --training torch_compile_regional=true --training pad_to_multiple_of=64)
graphs=(--training torch_compile=reduce-overhead --training torch_compile_regional=true --training pad_to_multiple_of=64)
if [[ " $checks " == *" bench "* ]]; then
bench full-eager 90 --run full
bench full-regional 200 --run full "${compiled[@]}"
bench full-regional-cudagraphs 200 --run full "${graphs[@]}"
bench lora-r8-eager 90 --run lora-r8
best=$(python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
rate = {}
for name in ("full-eager", "full-regional", "full-regional-cudagraphs"):
    p = Path(sys.argv[1]) / f"{name}.json"
    if p.exists():
        run = json.loads(p.read_text())["runs"]["lorasweep"][0]
        rate[name] = run["steady_tokens_per_s"] or run["tokens_per_s"]  # after compiling, where measured
best = max(rate, key=rate.get) if rate else "full-eager"
print("" if best == "full-eager" else best)
EOF
)
if [ -n "$best" ]; then
    if [ "$best" = full-regional ]; then bench lora-r8-regional 200 --run lora-r8 "${compiled[@]}"
    else bench lora-r8-regional-cudagraphs 200 --run lora-r8 "${graphs[@]}"; fi
else
    echo "lora-r8 compiled: skipped (no compiled full run beat eager)" | tee -a "$summary"
fi
fi

if [[ " $checks " != *" sweep "* ]]; then
    :
elif command -v snakemake >/dev/null; then  # 6. the default sweep's five runs, sharing the GPU five at a time
    sweep="$out/sweep"; mkdir -p "$sweep"
    printf 'dataset:\n  source: %s\ntraining:\n  jobs_per_gpu: 5\n' "$data" >"$sweep/checks.yaml"
    [ "$device" = cpu ] && echo "  max_steps: $steps" >>"$sweep/checks.yaml"  # a try of the script, not a measurement
    configs=(config/config.yaml); [ "$shape" = opt-350m ] && configs+=(config/opt-350m-shape.yaml)
    [ "$shape" = tiny ] && configs=(config/tiny.yaml)
    t0=$SECONDS
    timeout "$(cap 480)" snakemake --cores 16 --resources gpu=5 --set-threads train=3 --scheduler greedy \
        --directory "$sweep" --snakefile "$PWD/Snakefile" --configfile "${configs[@]/#/$PWD/}" "$sweep/checks.yaml" \
        >"$out/sweep.log" 2>&1
    rc=$?
    echo "five-run sweep, jobs_per_gpu 5: exit $rc, $((SECONDS - t0)) s wall ($(grep -c 'Finished job' "$out/sweep.log") jobs)" | tee -a "$summary"
    [ -f "$sweep/results/metrics.csv" ] && python3 - "$sweep/results/metrics.csv" <<'EOF' | tee -a "$summary"
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    print(f"    {r['run']:<10} train {float(r['train_runtime_s']):7.1f} s  {float(r['train_tokens_nonpad_per_s']):9,.0f} tokens/s"
          f"  MFU {r.get('mfu_pct') or '-'}  jobs beside {r.get('gpu_jobs_beside_max') or '-'}  eval loss {float(r['eval_loss']):.4f}")
EOF
else
    echo "five-run sweep: skipped (no snakemake)" | tee -a "$summary"
fi
