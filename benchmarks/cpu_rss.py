"""Peak resident memory of forward + backward passes on the CPU, full fine-tuning or LoRA, and its time.

    python benchmarks/cpu_rss.py --run full                                   # opt-350m's shape, 8 x 503
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/cpu_rss.py --run lora-r8

Under glibc's malloc the process keeps freed blocks for reuse, and once its mmap threshold has risen with
the tensors freed, large tensors come from a heap that is not given back: the peak RSS (what the workflow
reports as peak_rss_bytes on the CPU) then holds memory no tensor uses any more. A fixed threshold
(the environment variable above, read when the process starts) returns large tensors when they are freed.
This prints, per pass, the time and the peak RSS above the footprint after the model was built, so the two
settings can be compared (README, What the numbers mean: peak_rss_bytes).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="full", help="full or lora-r<rank> (LoRA on q/k/v, dropout 0.1)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=503)
    ap.add_argument("--layers", type=int, default=24, help="opt-350m: 24 layers of width 1024")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)

    import torch

    from lorasweep.memory import _return_freed_heap
    from lorasweep.tiny import random_opt

    # opt-350m's shape as the workflow builds it (config/opt-350m-shape.yaml), at --layers x --hidden
    model = random_opt(a.vocab, num_layers=a.layers, hidden_size=a.hidden, num_heads=max(1, a.hidden // 64),
                       ffn_dim=4 * a.hidden, word_embed_proj_dim=min(512, a.hidden), do_layer_norm_before=False,
                       max_positions=max(2048, a.length))
    if a.run != "full":
        from peft import get_peft_model

        from lorasweep.train import lora_config

        r = int(a.run.split("-r")[-1])
        model = get_peft_model(model, lora_config({"lora": {"r": r, "alpha": 4 * r, "dropout": 0.1}},
                                                  ["q_proj", "k_proj", "v_proj"]))
    model.train()
    ids = torch.randint(0, a.vocab, (a.batch, a.length))
    _return_freed_heap()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    passes = []
    for i in range(a.passes):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        # The kernel reads its RSS counters per CPU and approximately (Linux >= 6.2), so a later VmHWM can come out
        # a few pages below an earlier one; the peak since the reset is the largest read.
        peak = max(_status("VmHWM") - base, passes[-1]["peak_rss_above_base_bytes"] if passes else 0)
        passes.append({"seconds": time.perf_counter() - t0, "peak_rss_above_base_bytes": peak})
        print(f"pass {i + 1}: {passes[-1]['seconds']:.1f} s, peak RSS +{passes[-1]['peak_rss_above_base_bytes'] / 2**30:.2f} GiB",
              flush=True)
    out = {"run": a.run, "batch": a.batch, "length": a.length, "layers": a.layers, "hidden": a.hidden,
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "passes": passes}
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, out, __file__, argv)
    return out


if __name__ == "__main__":
    main()
