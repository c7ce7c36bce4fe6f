"""What torch.compile makes of lorasweep's training step, on any machine: graphs, graph breaks, and the graphs
CUDA graphs would be skipped for (inputs the graph mutates), with the source line that mutates them.

    python benchmarks/compile_graphs.py --data ../shared/data/codealpaca/code_alpaca_2k.json
    python benchmarks/compile_graphs.py --data ... --training torch_compile_regional=true

It trains a few steps of the tiny OPT with ``torch_compile: reduce-overhead`` (and ``pad_to_multiple_of: 64``)
on the CPU, inductor's caches off so that every graph is compiled and seen. On a CPU no CUDA graph is
recorded, but the graphs are the ones a GPU would compile, and inductor skips CUDA graphs for any graph that
mutates one of its inputs ("skipping cudagraphs due to mutated inputs", as on the H200 on 2026-11-26): this
finds them before a GPU is rented. Uses inductor internals (torch 2.13's ``CompiledFxGraph``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CodeAlpaca-format .json/.jsonl/.parquet")
    ap.add_argument("--run", default="full", help="full, lora-r<rank> or qlora-r<rank>")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--training", action="append", default=[], metavar="KEY=VALUE",
                    help="a training setting (YAML value), e.g. torch_compile_regional=true; repeatable")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"  # read when inductor compiles: set before any compiling
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

    import torch._dynamo
    import torch._inductor.output_code as output_code
    import yaml
    from torch._inductor.cudagraph_utils import get_placeholder_info, get_mutation_stack_trace

    from lorasweep import speed
    from lorasweep.data import prepare
    from lorasweep.tiny import build_tiny_model_from_jsonl

    graphs = []
    init = output_code.CompiledFxGraph.__init__

    def recording_init(self, current_callable, graph, gm, *args, **kwargs):
        init(self, current_callable, graph, gm, *args, **kwargs)
        mutated = sorted(self.mutated_input_idxs)
        where = None
        if mutated:  # the last source line of the stack trace inductor prints when it skips CUDA graphs
            trace = get_mutation_stack_trace(get_placeholder_info(gm.graph), mutated)
            found = re.search(r'File "(?:.*site-packages/)?([^"]+)", line (\d+), in (\S+)\s*\n\s*(.+)\s*$', trace)
            where = f"{found[1]}:{found[2]} ({found[3]}): {found[4].strip()}" if found else None
        graphs.append({"mutated_inputs": len(mutated), "mutated_at": where})

    output_code.CompiledFxGraph.__init__ = recording_init
    training = {"torch_compile": "reduce-overhead", "pad_to_multiple_of": 64,
                **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.training)}}
    work = Path(tempfile.mkdtemp(prefix="lorasweep-compile-"))
    train, evals = work / "train.jsonl", work / "eval.jsonl"
    prepare(a.data, train, evals, work / "summary.json", eval_size=0.05, seed=0)
    model = str(build_tiny_model_from_jsonl(train, work / "opt-tiny"))
    torch._dynamo.utils.counters.clear()
    try:
        speed.train_single_run(model, train, evals, work / "run", a.run, lr=1e-3, device="cpu", seed=0,
                               max_steps=a.steps, **training)
    finally:
        output_code.CompiledFxGraph.__init__ = init
    counters = torch._dynamo.utils.counters
    out = {"run": a.run, "steps": a.steps, "training": training, "graphs_compiled": len(graphs),
           "graph_breaks": sum(counters["graph_break"].values()),
           "graphs_with_mutated_inputs": sum(1 for g in graphs if g["mutated_inputs"]),
           "mutated_at": dict(collections.Counter(g["mutated_at"] for g in graphs if g["mutated_inputs"]))}
    print(f"{a.run}, {training}: {out['graphs_compiled']} graphs compiled, {out['graph_breaks']} graph breaks, "
          f"{out['graphs_with_mutated_inputs']} with mutated inputs (CUDA graphs skipped for them)")
    for line, n in out["mutated_at"].items():
        print(f"  {n} x mutated at: {line}")
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, out, __file__, argv)
    return out


if __name__ == "__main__":
    main()
