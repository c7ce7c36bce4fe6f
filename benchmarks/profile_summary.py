"""Where a training step's time goes, from a profile that ``throughput.py --profile DIR`` recorded:

    python benchmarks/throughput.py --data DATA --device cuda --recipes lorasweep --repeats 1 --steps 30 \\
        --profile prof --profile-steps 10,10
    python benchmarks/profile_summary.py prof [--json out.json]

For the profiled steps (``prof/profile.json``: their wall clock) it reads ``prof/trace.json.gz`` and prints,
per step:

- **GPU busy**: the time at least one kernel, copy or memset ran on the device (overlaps merged), and its
  share of the wall clock: what is left is time the GPU waited for the host;
- **host waits**: the calls in which the host blocked until the device caught up (``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, ``cudaMemcpy``; a blocking copy is an asynchronous
  copy and a stream synchronisation, counted once), how many a step has, how long they took, and the
  operators they happened in (``aten::item``, ``aten::nonzero``, ``aten::to``, ...). How long a wait takes
  depends on what the GPU still had queued: under the profiler, which slows the host, little;
- **launches**: kernels launched a step and the host time spent in the launch calls;
- the kernels that took the most device time, and the host operators that took the most time.

On the CPU there is no device side: the script then reports the host operators only.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

# calls that block the host until the device has caught up (a blocking copy is cudaMemcpyAsync followed by
# cudaStreamSynchronize, counted once, by the latter); cudaMemcpyAsync alone is listed apart (asynchronous)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
COPIES = ("cudaMemcpyAsync",)
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _enclosing(ops_by_tid: dict, ev: dict) -> str:
    """The innermost host operator on the event's thread that contains it, or '(none)'."""
    starts, ops = ops_by_tid.get(ev.get("tid"), ([], []))
    i = bisect.bisect_right(starts, ev["ts"])
    best = None
    for j in range(i - 1, max(-1, i - 200), -1):  # the nearest starting operators first
        op = ops[j]
        if op["ts"] + op.get("dur", 0) >= ev["ts"] + ev.get("dur", 0):
            if best is None or op.get("dur", 0) < best.get("dur", 0):
                best = op
    return best["name"] if best else "(none)"


def summarize(folder: str | Path, top: int = 12) -> dict:
    folder = Path(folder)
    meta = json.loads((folder / "profile.json").read_text())
    with gzip.open(folder / "trace.json.gz", "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps, wall_us = meta["steps"], meta["wall_s"] * 1e6
    cats = collections.defaultdict(list)
    for e in events:
        cats[e.get("cat", "")].append(e)
    ops = sorted(cats["cpu_op"] + cats["user_annotation"], key=lambda e: (e["ts"], -e["dur"]))  # a parent before the child it starts with
    ops_by_tid: dict = {}
    for op in ops:
        starts, lst = ops_by_tid.setdefault(op.get("tid"), ([], []))
        starts.append(op["ts"])
        lst.append(op)

    # host operators by self time: an operator's time less that of the operators it directly contains
    self_us = collections.Counter()
    calls = collections.Counter()
    for tid, (_, lst) in ops_by_tid.items():
        stack: list[dict] = []
        for op in lst:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= op["ts"]:
                stack.pop()
            if stack:
                self_us[stack[-1]["name"]] -= min(op["dur"], stack[-1]["ts"] + stack[-1]["dur"] - op["ts"])
            self_us[op["name"]] += op["dur"]
            calls[op["name"]] += 1
            stack.append(op)
    out = {"folder": str(folder), "device": meta["device"], "first_step": meta["first_step"], "steps": steps,
           "wall_ms_per_step": meta["wall_ms_per_step"],
           "host_ops_by_self_ms_per_step": [
               {"name": n, "ms_per_step": t / 1e3 / steps, "calls_per_step": calls[n] / steps}
               for n, t in self_us.most_common(top)]}

    device = [e for c in DEVICE_CATS for e in cats[c]]
    if device:
        busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in device])
        kernels = collections.Counter()
        for e in cats["kernel"]:
            kernels[e["name"][:90]] += e["dur"]
        runtime = cats["cuda_runtime"] + cats["cuda_driver"]
        # the profiler's own synchronisation at the end of the window (no operator around it) is not the step's
        syncs = [e for e in runtime if e["name"] in SYNCS
                 and not (e["name"] == "cudaDeviceSynchronize" and _enclosing(ops_by_tid, e) == "(none)")]
        copies = [e for e in runtime if e["name"] in COPIES]
        launches = [e for e in runtime if e["name"] in LAUNCHES]
        sites = collections.Counter()
        wait_at = collections.Counter()
        for e in syncs:
            site = f"{_enclosing(ops_by_tid, e)} ({e['name']})"
            sites[site] += 1
            wait_at[site] += e["dur"]
        out.update({
            "gpu_busy_ms_per_step": busy / 1e3 / steps,
            "gpu_busy_share_pct": 100 * busy / wall_us,
            "kernels_per_step": len(cats["kernel"]) / steps,
            "launches_per_step": len(launches) / steps,
            "launch_host_ms_per_step": sum(e["dur"] for e in launches) / 1e3 / steps,
            "async_copies_per_step": len(copies) / steps,
            "host_waits_per_step": len(syncs) / steps,
            "host_wait_ms_per_step": sum(e["dur"] for e in syncs) / 1e3 / steps,
            "host_waits_by_site": [{"site": s, "per_step": n / steps, "ms_per_step": wait_at[s] / 1e3 / steps}
                                   for s, n in sites.most_common(top)],
            "kernels_by_device_ms_per_step": [{"name": n, "ms_per_step": t / 1e3 / steps}
                                              for n, t in kernels.most_common(top)],
        })
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="the folder throughput.py --profile wrote")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args(argv)
    s = summarize(a.folder, a.top)
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, s, __file__, argv, None, indent=1)
    print(f"{s['folder']}: steps {s['first_step']}..{s['first_step'] + s['steps'] - 1} on {s['device']}, "
          f"{s['wall_ms_per_step']:.1f} ms a step (wall clock)")
    if "gpu_busy_ms_per_step" in s:
        print(f"  GPU busy {s['gpu_busy_ms_per_step']:.1f} ms a step ({s['gpu_busy_share_pct']:.0f}% of the wall "
              f"clock); {s['kernels_per_step']:.0f} kernels a step, {s['launches_per_step']:.0f} launch calls "
              f"taking {s['launch_host_ms_per_step']:.1f} ms of host time")
        print(f"  host waiting for the device: {s['host_waits_per_step']:.1f} waits, "
              f"{s['host_wait_ms_per_step']:.2f} ms a step, by operator (the time a wait takes is what the GPU "
              "still had queued; the profiler slows the host, so it shows less than an unprofiled step "
              f"would); {s['async_copies_per_step']:.1f} copies a step (cudaMemcpyAsync; a blocking one is "
              "also a wait):")
        for w in s["host_waits_by_site"]:
            print(f"    {w['per_step']:5.1f} a step  {w['ms_per_step']:7.2f} ms  {w['site']}")
        print("  kernels by device time a step:")
        for k in s["kernels_by_device_ms_per_step"]:
            print(f"    {k['ms_per_step']:7.2f} ms  {k['name']}")
    print("  host operators by self time a step:")
    for o in s["host_ops_by_self_ms_per_step"]:
        print(f"    {o['ms_per_step']:7.2f} ms  {o['calls_per_step']:6.1f} calls  {o['name']}")
    return s


if __name__ == "__main__":
    main()
