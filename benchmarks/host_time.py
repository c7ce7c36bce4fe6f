"""Host time of a training step: lorasweep's step against a bare PyTorch loop, on a model too narrow to compute.

    python benchmarks/host_time.py --data ../shared/data/codealpaca/code_alpaca_2k.json [--run lora-r8] [--repeats 3]

On a fast GPU at the write-ups' batch the step is bound by the host queueing kernels (README, Speed: On a
GPU), so what costs there is the Python and dispatcher time each step spends, not its arithmetic. This
measures that time on the CPU: opt-350m's depth (24 decoder layers) with hidden size 32, one torch thread,
batch 8 of the real data, so the arithmetic is negligible and a step's time is nearly all framework
overhead. It trains the same model on the same split two ways for the same steps: lorasweep's step (the
Trainer, TRL's loss, lorasweep's callbacks: :func:`lorasweep.speed.train_single_run`) and a bare loop
(forward with the model's own loss, backward, gradient clipping, fused AdamW), length-grouped batches in
both, right-padded and fed with positions instead of the attention mask as lorasweep feeds them. It prints
ms per step of each (median of ``--repeats``, interleaved), the bare loop's split by phase, and the
difference: what the Trainer, TRL and lorasweep add. Both figures include their first steps. The CPU runs
TRL's loss through its torch fallback (on CUDA it is a few Triton kernels), so that share of the difference
does not carry over.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

NARROW = dict(hidden_size=32, num_heads=2, ffn_dim=64)


def grouped_batches(model_path: Path, train_jsonl: Path, batch: int, max_length: int, seed: int) -> list:
    """The split's token ids in length-grouped batches (sorted by length, cut in batches, shuffled)."""
    from transformers import AutoTokenizer

    from lorasweep.data import read_jsonl

    tok = AutoTokenizer.from_pretrained(model_path)
    seqs = sorted((tok(r["prompt"] + r["completion"], truncation=True, max_length=max_length)["input_ids"]
                   for r in read_jsonl(train_jsonl)), key=len)
    batches = [seqs[i:i + batch] for i in range(0, len(seqs) - batch + 1, batch)]
    random.Random(seed).shuffle(batches)
    return batches


def bare_loop(model_path: Path, train_jsonl: Path, batches: list, run: str, steps: int, seed: int,
              precision: str = "fp32") -> dict:
    """Forward, backward, clipping and fused AdamW on ``batches`` (:func:`grouped_batches`); ms per phase. With
    ``precision`` bf16 the forward runs under bf16 autocast, a LoRA run's frozen base is stored in bf16 and a QLoRA
    run's 4-bit layers are fed bf16, as lorasweep trains (``training.frozen_weights_16bit``)."""
    import torch

    from lorasweep.config import run_spec
    from lorasweep.speed import single_run_config
    from lorasweep.train import attach_lora, frozen_base_16bit, load_model

    torch.manual_seed(seed)
    spec = run_spec(single_run_config(str(model_path), train_jsonl, run, lr=1e-3, device="cpu", seed=seed), run)
    model = load_model(spec, "cpu", precision)  # QLoRA: 4-bit, as lorasweep loads it
    pad = model.config.pad_token_id
    if run != "full":
        model = attach_lora(model, spec)
        frozen_base_16bit(model, precision)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    phases = {"forward": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}
    tokens = 0
    t_all = time.perf_counter()
    for step in range(steps):
        rows = batches[step % len(batches)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = ids.masked_fill(mask == 0, -100)
        positions = torch.arange(width).expand(len(rows), width)  # as lorasweep feeds right-padded batches
        tokens += int(mask.sum())
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, position_ids=positions, labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name] += dt
    total = time.perf_counter() - t_all
    return {"ms_per_step": 1e3 * total / steps, "tokens": tokens,
            "phases_ms_per_step": {k: 1e3 * v / steps for k, v in phases.items()}}


def walk_costs(model_path: Path, train_jsonl: Path, run: str, seed: int, repeats: int = 50) -> dict:
    """ms a call of what the Trainer does to the whole model every step, on the run's model (PEFT's LoRA layers
    add modules): ``model.train()``, ``model.zero_grad()``, listing ``model.parameters()`` (clipping) and
    counting them (``num_parameters(exclude_embeddings=True)``, for ``total_flos``). Each is a walk over every
    module; lorasweep's step skips the last two (``lorasweep.trainer.SKIP_MODULE_WALKS``)."""
    from lorasweep.config import run_spec
    from lorasweep.speed import single_run_config
    from lorasweep.train import attach_lora, load_model

    spec = run_spec(single_run_config(str(model_path), train_jsonl, run, lr=1e-3, device="cpu", seed=seed), run)
    model = load_model(spec, "cpu", "fp32")
    if run != "full":
        model = attach_lora(model, spec)
    model.train()
    calls = {"train": model.train, "zero_grad": model.zero_grad, "list_parameters": lambda: list(model.parameters()),
             "num_parameters": lambda: model.num_parameters(exclude_embeddings=True)}
    out = {"modules": sum(1 for _ in model.modules()), "parameter_tensors": sum(1 for _ in model.parameters())}
    for name, call in calls.items():
        call()
        t0 = time.perf_counter()
        for _ in range(repeats):
            call()
        out[f"{name}_ms"] = 1e3 * (time.perf_counter() - t0) / repeats
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CodeAlpaca-format .json/.jsonl/.parquet")
    ap.add_argument("--run", default="full", help="full, lora-r<rank> or qlora-r<rank>")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainer-walks", action="store_true",
                    help="also time lorasweep's step with the Trainer's own per-step walks over every module "
                         "(lorasweep.trainer.SKIP_MODULE_WALKS off: parameters counted for total_flos, listed for "
                         "clipping), interleaved with the others")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: both loops under bf16 autocast (as on a GPU), a LoRA base stored in bf16")
    ap.add_argument("--fp32-frozen-base", action="store_true",
                    help="with --precision bf16 and a LoRA run, also time lorasweep's step with its frozen base in "
                         "fp32 (training.frozen_weights_16bit=false: autocast casts it at every forward), paired; "
                         "with a QLoRA run, with its 4-bit layers' outputs in their input's dtype (fp32 after a "
                         "layer norm: bitsandbytes' own way)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)

    import torch

    from lorasweep import speed
    from lorasweep.data import prepare
    from lorasweep.tiny import build_tiny_model_from_jsonl

    torch.set_num_threads(1)  # host time, not parallel arithmetic
    work = Path(tempfile.mkdtemp(prefix="host-time-"))
    train, evals = work / "train.jsonl", work / "eval.jsonl"
    prepare(a.data, train, evals, work / "summary.json", eval_size=0.05, seed=a.seed)
    model = build_tiny_model_from_jsonl(train, work / "narrow", num_layers=a.layers, **NARROW)

    batches = grouped_batches(model, train, a.batch, a.max_length, a.seed)
    import lorasweep.trainer as lt

    if a.fp32_frozen_base and (a.precision != "bf16" or a.run == "full"):
        ap.error("--fp32-frozen-base compares a LoRA or QLoRA run's frozen base under bf16: --precision bf16 "
                 "--run lora-r<rank> (or qlora-r<rank>)")

    def lorasweep_ms(name: str, skip_walks: bool, frozen_16bit: bool = True) -> tuple[float, dict]:
        lt.SKIP_MODULE_WALKS = skip_walks
        try:
            m = speed.train_single_run(str(model), train, evals, work / name, a.run, lr=1e-3, device="cpu",
                                       seed=a.seed, max_steps=a.steps, batch_size=a.batch, max_length=a.max_length,
                                       threads=1, precision=a.precision, frozen_weights_16bit=frozen_16bit)
        finally:
            lt.SKIP_MODULE_WALKS = True
        return 1e3 * m["train_runtime_s"] / m["train_steps"], m

    ours, bares, walking, fp32_base = [], [], [], []
    for i in range(a.repeats):  # interleaved, so a slow phase of a shared machine hits all
        arms = {"ours": lambda: lorasweep_ms(f"lorasweep-{i}", True),
                "bare": lambda: bare_loop(model, train, batches, a.run, a.steps, a.seed, a.precision)}
        if a.trainer_walks:
            arms["walks"] = lambda: lorasweep_ms(f"walks-{i}", False)
        if a.fp32_frozen_base:
            arms["fp32"] = lambda: lorasweep_ms(f"fp32-base-{i}", True, frozen_16bit=False)
        # every other repeat in reverse order: a machine that slows down (or speeds up) during a run favours no arm
        got = {name: arms[name]() for name in (list(arms) if i % 2 == 0 else list(arms)[::-1])}
        ms, m = got["ours"]
        ours.append(ms)
        bares.append(got["bare"])
        if "walks" in got:
            walking.append(got["walks"][0])
        if "fp32" in got:
            ms32, m32 = got["fp32"]
            if m32["train_loss"] != m["train_loss"]:
                raise RuntimeError(f"the base's storage changed the training loss: {m32['train_loss']} against "
                                   f"{m['train_loss']} (it should not: autocast computes with the same 16-bit values)")
            fp32_base.append(ms32)
        print(f"[{i + 1}/{a.repeats}] lorasweep {ours[-1]:.1f} ms, bare loop {bares[-1]['ms_per_step']:.1f} ms a step"
              + (f", lorasweep with the Trainer's walks {walking[-1]:.1f} ms" if walking else "")
              + (f", lorasweep with frozen_weights_16bit off {fp32_base[-1]:.1f} ms" if fp32_base else ""), flush=True)
    mine = statistics.median(ours)
    bare = statistics.median(b["ms_per_step"] for b in bares)
    phases = {k: statistics.median(b["phases_ms_per_step"][k] for b in bares) for k in bares[0]["phases_ms_per_step"]}
    out = {"run": a.run, "layers": a.layers, **NARROW, "steps": a.steps, "batch": a.batch, "repeats": a.repeats,
           "precision": a.precision,
           "lorasweep_ms_per_step": mine, "bare_ms_per_step": bare, "bare_phases_ms_per_step": phases,
           "lorasweep_ms_per_step_each": ours, "bare_ms_per_step_each": [b["ms_per_step"] for b in bares],
           "tokens": {"lorasweep": m["train_tokens_nonpad"], "bare": bares[0]["tokens"]}}
    out["walk_costs"] = walk_costs(model, train, a.run, a.seed)
    if walking:
        out.update(trainer_walks_ms_per_step=statistics.median(walking), trainer_walks_ms_per_step_each=walking,
                   walks_saved_ms_per_step_each=[w - o for w, o in zip(walking, ours)])
    if fp32_base:
        out.update(fp32_frozen_base_ms_per_step=statistics.median(fp32_base), fp32_frozen_base_ms_per_step_each=fp32_base,
                   frozen_16bit_saved_ms_per_step_each=[f - o for f, o in zip(fp32_base, ours)])
    print(f"{a.run}, OPT with {a.layers} layers of width {NARROW['hidden_size']}, batch {a.batch}, {a.steps} steps, "
          f"{a.precision}, 1 thread (host time: the arithmetic is negligible), median of {a.repeats}:")
    print(f"  lorasweep's step : {mine:7.1f} ms")
    print(f"  bare loop        : {bare:7.1f} ms  (" + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + ")")
    print(f"  added by the Trainer, TRL's loss and lorasweep: {mine - bare:+.1f} ms a step")
    w = out["walk_costs"]
    print(f"  the Trainer's walks over the model ({w['modules']} modules), ms a call: " + ", ".join(
        f"{k.removesuffix('_ms')} {v:.2f}" for k, v in w.items() if k.endswith("_ms"))
        + " (lorasweep skips the last two)")
    if walking:
        print(f"  lorasweep's step with the Trainer's walks over every module: "
              f"{out['trainer_walks_ms_per_step']:7.1f} ms (paired, each repeat: " + ", ".join(f"{d:+.1f}" for d in out["walks_saved_ms_per_step_each"]) + " ms)")
    if fp32_base:
        print(f"  lorasweep's step with frozen_weights_16bit off (an fp32 base, fp32 4-bit outputs): "
              f"{out['fp32_frozen_base_ms_per_step']:7.1f} ms (paired, each repeat: "
              + ", ".join(f"{d:+.1f}" for d in out["frozen_16bit_saved_ms_per_step_each"]) + " ms; same losses)")
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, out, __file__, argv)
    return out


if __name__ == "__main__":
    main()
