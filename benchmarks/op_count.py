"""Operations one training step asks the device for: full fine-tuning against LoRA, on OPT's layer structure.

    python benchmarks/op_count.py            # opt-350m's 24 layers, narrow widths, batch 8 x 128

Where the host is the bottleneck (a fast GPU at small batches: README, Speed: On a GPU) a step's time
follows the number of operations issued, not the FLOPs. This counts the aten operations of one forward
and backward pass (bf16 autocast, as on a GPU) with a dispatch mode, on the CPU; views (which launch no
kernel) are counted apart. LoRA is counted with its frozen base stored in bf16 (``training.frozen_weights_16bit``,
lorasweep's default with 16-bit training) and in fp32 (autocast then casts every frozen weight at every forward);
QLoRA with its 4-bit layers fed 16-bit inputs (lorasweep's default, ``training.frozen_weights_16bit`` too) and
as bitsandbytes leaves them (the output in the input's dtype: fp32 after a layer norm, cast back and forth).
The widths are narrow because the count does not depend on them. bitsandbytes' 4-bit product and dequantization
count as one operation each (on CUDA at training shapes the product is a dequantization kernel and a matrix
product). An untimed forward pass goes first: the count is a step's, not the first call's one-time work.
"""

from __future__ import annotations

import argparse
import collections
import tempfile

VIEWS = {"view", "t", "transpose", "detach", "expand", "unsqueeze", "reshape", "_unsafe_view", "slice", "select",
         "permute", "as_strided", "alias", "squeeze", "split", "_reshape_alias", "unbind"}


def count_step(run: str, layers: int, rank: int, dropout: float, batch: int, length: int,
               frozen_16bit: bool = False) -> dict:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from torch.utils._python_dispatch import TorchDispatchMode

    from lorasweep.tiny import random_opt
    from lorasweep.train import frozen_base_16bit, load_model, lora_config

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    model = random_opt(1000, num_layers=layers, max_positions=max(512, length))  # the workflow's OPT, narrow
    with tempfile.TemporaryDirectory() as tmp:
        if run == "qlora":  # quantized as lorasweep loads it (nf4, bf16 compute), prepared as PEFT trains it
            model.save_pretrained(tmp)
            model = load_model({"model": {"name_or_path": tmp, "trust_remote_code": False},
                                "quantization": {"quant_type": "nf4", "double_quant": False}}, "cpu", "bf16")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if run != "full":
            model = get_peft_model(model, lora_config({"lora": {"r": rank, "alpha": 4 * rank, "dropout": dropout}},
                                                      ["q_proj", "k_proj", "v_proj"]))
            if frozen_16bit:  # training.frozen_weights_16bit, as lorasweep trains with bf16 autocast
                frozen_base_16bit(model, "bf16")
        model.train()
        ids = torch.randint(0, 1000, (batch, length))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # one-time work out of the count
            model(input_ids=ids)  # (bitsandbytes converts each 4-bit layer's bias to 16 bits at its first call)
        with Count() as c:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    return {"ops": sum(c.ops.values()), "ops_not_views": sum(v for k, v in c.ops.items() if k not in VIEWS),
            "mm": c.ops["mm"] + c.ops["addmm"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--json", help="write the counts here")
    a = ap.parse_args(argv)
    # name: (dropout, training.frozen_weights_16bit: a LoRA base stored in bf16, 4-bit layers fed bf16)
    runs = {"full": (0.0, False), f"lora-r{a.rank}, fp32 base": (0.1, False),
            f"lora-r{a.rank}, fp32 base, dropout 0": (0.0, False), f"lora-r{a.rank}": (0.1, True),
            f"lora-r{a.rank}, dropout 0": (0.0, True), f"qlora-r{a.rank}, 4-bit outputs fp32": (0.1, False),
            f"qlora-r{a.rank}": (0.1, True)}
    out = {name: count_step(name.split("-")[0], a.layers, a.rank, p, a.batch, a.length, half)
           for name, (p, half) in runs.items()}
    base = out["full"]["ops_not_views"]
    print(f"operations per forward + backward, OPT with {a.layers} layers, LoRA on q/k/v, bf16 autocast:")
    for name, c in out.items():
        print(f"  {name:34s} {c['ops']:6,d} in all, {c['ops_not_views']:6,d} not views "
              f"({c['ops_not_views'] / base:.2f}x full), {c['mm']:4d} matrix products")
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, out, __file__, argv)
    return out


if __name__ == "__main__":
    main()
