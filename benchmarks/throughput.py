"""Throughput of lorasweep's training step against the plain SFTTrainer recipe, on the same model, data and machine.

    python benchmarks/throughput.py --data ../shared/data/codealpaca/code_alpaca_2k.json --repeats 3

Both recipes train the same model (by default the tiny OPT, built here with a tokenizer trained on the
data) on the same prepared split, for the same number of optimizer steps, batch size, learning rate and
max length. *Plain* is TRL's `SFTTrainer` with `SFTConfig` defaults for everything else (but fp32 on the CPU, as
lorasweep's recipe there): random batches padded to the longest, as the write-ups ran it, and activation
checkpointing on, TRL 1.x's default, which the write-ups most likely did not have (W1 names it as a remedy,
W4 set ``TrainingArguments``, whose default is off): ``plain-nockpt`` turns it off. The speed-up is
printed against the faster of the plain variants run (and against each).
*lorasweep* is `lorasweep.train.train_run`, the step the workflow runs (length-grouped batches,
activation checkpointing off unless asked for). Tokens/s counts prompt + response tokens without
padding, over training time only. The median of ``--repeats`` runs is printed, with the eval loss each
recipe reached on the held-out split after the same steps (per response token, both scored the same
way), and the untrained model's, which each recipe scores before its training (untimed): the same figure
for every recipe shows they started from the same model and scored the same eval examples. Repeat i
trains with seed + i (another data order and dropout, and for LoRA another adapter initialisation, on the
same split and the same model weights), so the eval-loss difference comes with its seed-to-seed spread.
Pass ``--model`` for a real model (local path or hub id), or ``--shape opt-350m`` for opt-350m's architecture with random weights (its speed and
memory without the Hub), and ``--device cuda`` on a GPU, where MFU and CUDA memory peaks are printed too.
``--training KEY=VALUE`` (repeatable) sets a training key of lorasweep's recipe, e.g. ``torch_compile=true``;
each run prints, beside its rate over the whole of training, the rate over its second half (after warm-up
and any compiling). lorasweep's progress lines (steps, losses, evaluations) go to stderr as it trains.
``--host-reads`` also counts, per training step and per recipe, where Python reads a tensor's value
(``.item()``, ``if t:``, ...: each one a wait for the GPU; ``lorasweep.speed.HostReads``), by site.
Counting intercepts every torch call, so the rates of such a run are not the recipes' own.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from lorasweep import speed
from lorasweep.data import prepare, read_jsonl
from lorasweep.logs import console_progress
from lorasweep.memory import PeakMemory
from lorasweep.provenance import hardware, hardware_label, write_benchmark_json
from lorasweep.scoring import per_example_losses, token_weighted



PEAKS = ("peak_rss_bytes", "peak_cuda_allocated_bytes", "peak_cuda_reserved_bytes")
BOUND = ("mfu_ceiling_pct", "tokens_per_s_ceiling", "step_floor_ms", "step_floor_memory_ms")  # CUDA only


def plain_recipe(model_path: str, train_jsonl: Path, eval_jsonl: Path, out: Path, *, run: str, steps: int,
                 batch: int, lr: float, max_length: int, device: str, seed: int, checkpointing: bool = True) -> dict:
    """TRL SFTTrainer with SFTConfig defaults apart from what both recipes must share."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)
    cols = ("prompt", "completion")
    train = Dataset.from_list([{k: r[k] for k in cols} for r in read_jsonl(train_jsonl)])
    evals = Dataset.from_list([{k: r[k] for k in cols} for r in read_jsonl(eval_jsonl)])
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_config = None
    if run.startswith("lora-r"):
        r = int(run.split("r")[-1])
        peft_config = LoraConfig(r=r, lora_alpha=4 * r, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"],
                                 task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                     max_length=max_length, seed=seed, report_to="none", disable_tqdm=True, save_strategy="no",
                     use_cpu=device == "cpu",
                     # SFTConfig defaults bf16=True; the CPU runs here are fp32 in both recipes
                     bf16=device == "cuda", activation_checkpointing=checkpointing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok,
                         peft_config=peft_config)
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # prints every log dict; not part of the work measured

    class Window(TrainerCallback):  # the window lorasweep times: first step's start to the last step's end
        def on_train_begin(self, *args, **kwargs):
            self.begin = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            self.end = time.perf_counter()

    window = Window()
    trainer.add_callback(window)
    # the untrained model scored first, as lorasweep's recipe does before its training (outside the window, with
    # the collator's batches not counted): both run the same passes before their timed steps, and both report
    # the same figure when they start from the same model and score the same eval examples the same way
    base_eval_loss = token_weighted(per_example_losses(trainer))
    # non-padding tokens of every batch, counted on the host as the collator builds it: the Trainer's own count
    # (include_num_input_tokens_seen, off by default) would read a value back from the device every step
    tokens_per_batch, labelled_per_batch, collate = [], [], trainer.data_collator

    def counting_collator(features):
        batch_ = collate(features)
        tokens_per_batch.append(int(batch_["attention_mask"].sum()))
        labelled_per_batch.append(int((batch_["labels"] != -100).sum()))  # the positions the LM head projects
        return batch_

    trainer.data_collator = counting_collator
    memory = PeakMemory(device)  # lorasweep's measure, same baseline: model loaded, peaks counted from here
    memory.reset()
    trainer.train()
    seconds = window.end - window.begin
    peaks = {k: v for k, v in memory.read().items() if k in PEAKS}
    tokens = sum(tokens_per_batch[:steps])  # the batches trained on (a dataloader may build one ahead)
    labelled = sum(labelled_per_batch[:steps])
    eval_loss = token_weighted(per_example_losses(trainer))  # the measure lorasweep reports, on the same split
    weights = list(trainer.model.parameters())  # the adapter's included, as lorasweep counts them
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "eval_loss": eval_loss,
            "base_eval_loss": base_eval_loss, "activation_checkpointing": bool(args.activation_checkpointing), **peaks,
            "params": sum(w.numel() for w in weights), "trainable": sum(w.numel() for w in weights if w.requires_grad),
            "flop_shape": {**speed.flop_params(trainer.model), "labelled_share": labelled / tokens},
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"}


def second_half_rate(history: Path) -> float | None:
    """Non-padding tokens/s over the second half of training (logged records): the steady state, after
    warm-up and any compilation, which the whole-run figure includes. Evaluations in between are left out,
    as in the whole-run figure."""
    recs = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    logs = [r for r in recs if "loss" in r and "eval_loss" not in r]
    if len(logs) < 3:
        return None
    a, b = logs[len(logs) // 2], logs[-1]
    evals = sum(r.get("eval_runtime", 0.0) for r in recs
                if "eval_loss" in r and a["elapsed_s"] < r["elapsed_s"] <= b["elapsed_s"])
    dt = b["elapsed_s"] - a["elapsed_s"] - evals
    return (b["tokens_nonpad_seen"] - a["tokens_nonpad_seen"]) / dt if dt > 0 else None


def lorasweep_recipe(model_path: str, train_jsonl: Path, eval_jsonl: Path, out: Path, *, run: str, steps: int,
                     batch: int, lr: float, max_length: int, device: str, seed: int,
                     training: dict | None = None, lora: dict | None = None, callbacks=()) -> dict:
    m = speed.train_single_run(model_path, train_jsonl, eval_jsonl, out, run, lr=lr, device=device, seed=seed,
                               callbacks=callbacks, lora=lora, max_steps=steps, batch_size=batch, max_length=max_length, **(training or {}))
    return {"tokens_per_s": m["train_tokens_nonpad_per_s"], "tokens": m["train_tokens_nonpad"],
            "steady_tokens_per_s": second_half_rate(out / "log_history.jsonl"),
            "tokens_padded": m["train_tokens_padded"],
            "seconds": m["train_runtime_s"], "eval_loss": m["eval_loss"], "base_eval_loss": m["base_eval_loss"],
            "padding_share_pct": m["padding_share_pct"],
            "params": m["total_params"], "trainable": m["trainable_params"],
            "flop_shape": speed.flop_shape(m, m["train_tokens_labelled"] / m["train_tokens_nonpad"]),
            "frozen_16bit": m["frozen_16bit_params"], "hardware": m["hardware"],
            "precision": m["precision"], "steps": m["train_steps"], **{k: m[k] for k in PEAKS + BOUND if m.get(k) is not None}}


PLAIN = ("plain", "plain, checkpointing off")  # the plain recipe's variants, by the name printed
RECIPES = {"plain": ("plain", plain_recipe),  # --recipes key: (name printed, function)
           "plain-nockpt": ("plain, checkpointing off", functools.partial(plain_recipe, checkpointing=False)),
           "lorasweep": ("lorasweep", lorasweep_recipe)}


def _release_memory() -> None:
    """Free the finished recipe's model, so that the next one's peak is its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CodeAlpaca-format .json/.jsonl/.parquet (or hub id)")
    ap.add_argument("--model", help="model path or hub id; default: build a random OPT on the data (--shape)")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "opt-350m"],
                    help="the OPT built when no --model is given: the tiny preset's, or facebook/opt-350m's "
                         "(331 M parameters, random weights: its speed and memory, offline)")
    ap.add_argument("--run", default="full", help="full, lora-r<rank>, or qlora-r<rank> (lorasweep's recipe only)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                    help="an untimed run of N steps of the first recipe before the timed ones, so that the process's "
                         "first steps on the device (CUDA context, cuBLAS, kernel loading) are billed to no recipe; "
                         "default 10 on CUDA, 0 on the CPU. Repeats also alternate the recipes' order")
    ap.add_argument("--recipes", default=",".join(RECIPES),
                    help="comma-separated subset of plain, plain-nockpt (checkpointing off), lorasweep")
    ap.add_argument("--training", action="append", default=[], metavar="KEY=VALUE",
                    help="a training setting for lorasweep's recipe (YAML value), e.g. torch_compile=true or "
                         "pad_to_multiple_of=64; repeatable")
    ap.add_argument("--lora", action="append", default=[], metavar="KEY=VALUE",
                    help="a methods.lora setting for lorasweep's LoRA / QLoRA run (YAML value), e.g. dropout=0 or "
                         "target_modules=all-linear; repeatable")
    ap.add_argument("--host-reads", action="store_true",
                    help="count the tensor reads per training step (waits for the GPU) by site; slows every "
                         "recipe, so its rates are not comparable")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", metavar="DIR",
                    help="profile lorasweep's steps FIRST+1..FIRST+N of the first seed (--profile-steps) with "
                         "torch.profiler into DIR; benchmarks/profile_summary.py DIR reads it")
    ap.add_argument("--profile-steps", default="10,10", metavar="FIRST,N")
    a = ap.parse_args(argv)
    console_progress()  # lorasweep's step and evaluation lines on stderr while it trains
    wanted = [r.strip() for r in a.recipes.split(",") if r.strip()]
    if not wanted or set(wanted) - set(RECIPES):
        ap.error(f"--recipes: choose from {', '.join(RECIPES)}")
    if not re.fullmatch(r"full|(q?lora)-r\d+", a.run) or (a.run.startswith("qlora") and wanted != ["lorasweep"]):
        ap.error("--run: full or lora-r<rank>; qlora-r<rank> only with --recipes lorasweep (the plain recipe "
                 "has no 4-bit base)")
    try:
        first, n_prof = (int(x) for x in a.profile_steps.split(","))
    except ValueError:
        ap.error("--profile-steps: FIRST,N (two whole numbers)")
    if a.profile and ("lorasweep" not in wanted or first < 0 or n_prof < 1 or first + n_prof >= a.steps):
        ap.error(f"--profile: needs lorasweep in --recipes and FIRST + N < --steps ({a.steps}), the last step "
                 "being followed by the evaluation")

    recipes = dict(RECIPES[r] for r in wanted)
    overrides = {}
    for flag in ("training", "lora"):
        if getattr(a, flag):
            import yaml

            if "lorasweep" not in recipes:
                ap.error(f"--{flag} applies to lorasweep's recipe: add lorasweep to --recipes")
            if flag == "lora" and a.run == "full":
                ap.error("--lora applies to a lora-r<rank> or qlora-r<rank> --run, not to full")
            pairs = [kv.split("=", 1) for kv in getattr(a, flag)]
            if any(len(p) != 2 for p in pairs):
                ap.error(f"--{flag} takes KEY=VALUE")
            overrides[flag] = {k: yaml.safe_load(v) for k, v in pairs}
    if overrides:
        recipes["lorasweep"] = functools.partial(lorasweep_recipe, **overrides)

    work = Path(tempfile.mkdtemp(prefix="lorasweep-bench-"))
    train, evals, summary = work / "train.jsonl", work / "eval.jsonl", work / "summary.json"
    n_train = prepare(a.data, train, evals, summary, eval_size=0.05, seed=a.seed)["train_examples"]
    epoch = -(-n_train // a.batch)  # steps in an epoch, the last batch partial
    if a.steps % epoch:
        print(f"note: {a.steps} steps of batch {a.batch} are not a whole number of epochs of the {n_train} training "
              f"examples ({epoch} steps each): the recipes' samplers (random, length-grouped) then feed different "
              "examples, and the eval losses compare different token counts (printed beside them)", flush=True)
    model = a.model
    if model is None:
        from lorasweep.tiny import OPT_350M_SHAPE, build_tiny_model_from_jsonl

        model = str(build_tiny_model_from_jsonl(train, work / f"opt-{a.shape}",
                                                **(OPT_350M_SHAPE if a.shape == "opt-350m" else {})))
    common = dict(run=a.run, steps=a.steps, batch=a.batch, lr=a.lr, max_length=a.max_length, device=a.device,
                  seed=a.seed)
    warmup = a.warmup_steps if a.warmup_steps is not None else (10 if a.device == "cuda" else 0)
    if warmup > 0:
        name, fn = next(iter(recipes.items()))
        t0 = time.perf_counter()
        fn(model, train, evals, work / "warmup", **{**common, "steps": warmup})
        _release_memory()
        print(f"warm-up: {warmup} untimed steps of {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {k: [] for k in recipes}
    for i in range(a.repeats):  # interleaved, so a slow phase of the machine hits every recipe
        order = list(recipes.items())  # and each recipe first as often as the others (odd repeats reversed)
        for name, fn in (order[::-1] if i % 2 else order):  # repeat i trains with seed + i: same split
            extra = {}
            if a.profile and name == "lorasweep" and i == 0:
                extra["callbacks"] = [speed.step_profiler(a.profile, first, n_prof)]
            with speed.HostReads() if a.host_reads else contextlib.nullcontext() as reads:
                r = fn(model, train, evals, work / f"{i}-{name.replace(', ', '-').replace(' ', '-')}",
                       **{**common, "seed": a.seed + i}, **extra)
            if reads is not None:
                r["host_reads_per_step"] = {k: n / a.steps for k, n in reads.in_steps().items()}
            results[name].append(r)
            _release_memory()
            steady = f"  (second half {r['steady_tokens_per_s']:,.0f})" if r.get("steady_tokens_per_s") else ""
            print(f"[{i + 1}/{a.repeats}] {name:24s} {r['tokens_per_s']:>10,.0f} tokens/s{steady}  {r['seconds']:6.2f} s"
                  f"  eval loss {r['eval_loss']:.4f}", flush=True)

    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    ev = {k: statistics.mean(r["eval_loss"] for r in v) for k, v in results.items()}
    summary_out = {"run": a.run, "steps": a.steps, "batch": a.batch, "max_length": a.max_length, "device": a.device,
                   "model": a.model or f"random OPT, {a.shape} shape (built on the data)", "data": a.data,
                   "repeats": a.repeats, "warmup_steps": warmup, "hardware": hardware_label(hardware(a.device)),
                   "median_tokens_per_s": med,
                   "lorasweep_training": overrides.get("training", {}), "lorasweep_lora": overrides.get("lora", {}),
                   "mean_eval_loss": ev, "tokens_per_run": {k: [r["tokens"] for r in v] for k, v in results.items()},
                   "runs": results}
    # every recipe scores the untrained model on the eval split before training: one figure for all of them, or
    # they did not start from the same model, or did not score the same examples the same way
    summary_out["base_eval_loss"] = base_eval = {k: v[0]["base_eval_loss"] for k, v in results.items()}
    if max(base_eval.values()) - min(base_eval.values()) > 1e-3 * abs(min(base_eval.values())):
        print("note: the recipes scored the untrained model differently on the eval split ("
              + ", ".join(f"{k} {v:.5f}" for k, v in base_eval.items()) + "): not the same model, eval examples or "
              "loss, so their eval losses after training do not compare", flush=True)
    if "lorasweep" in results:
        summary_out["lorasweep_padding_share_pct"] = results["lorasweep"][0]["padding_share_pct"]
    seeds = (f"{a.repeats} seeds ({a.seed}..{a.seed + a.repeats - 1})" if a.repeats > 1 else f"seed {a.seed}")
    print(f"\n{a.run} on {summary_out['hardware']}, {a.steps} steps x batch {a.batch}, {seeds}: median tokens/s, "
          "mean eval loss per response token")
    # the baseline: the faster plain variant run. TRL 1.x turns activation checkpointing on by default; the write-ups
    # most likely trained without it (W1 suggests it as a remedy, W4 set TrainingArguments, whose default is off),
    # and on the H100 it made the plain recipe 3.0-3.2x slower by the medians, 2.4-4.6x seed by seed
    # (benchmarks/results/h100-2026-11-25.md): a ratio against the checkpointed variant alone would credit lorasweep
    # with that
    plains = [k for k in PLAIN if k in med]
    base_name = max(plains, key=med.get) if plains else None
    base = med[base_name] if base_name else None
    for name in recipes:
        ratio = f" ({med[name] / base:.2f}x)" if base else ""
        counts = sorted({r["tokens"] for r in results[name]})
        print(f"  {name:24s}: {med[name]:>10,.0f} non-padding tokens/s{ratio}, eval loss {ev[name]:.4f} after "
              f"{' / '.join(f'{c:,}' for c in counts)} tokens")
    if base and "lorasweep" in results:
        # eval loss of lorasweep minus the baseline's, paired by training seed: mean and a 95% t-interval over the seeds
        from lorasweep.findings import t975

        diffs = [x["eval_loss"] - y["eval_loss"] for x, y in zip(results["lorasweep"], results[base_name])]
        half = t975(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        summary_out["eval_loss_diff_lorasweep_minus_plain"] = {"per_seed": diffs, "mean": statistics.mean(diffs),
                                                               "ci95_half": half}
        summary_out["speedup"] = med["lorasweep"] / base
        summary_out["speedup_baseline"] = base_name
        summary_out["speedup_vs"] = {k: med["lorasweep"] / med[k] for k in plains}
        print(f"  speed-up of lorasweep over the plain recipe: {summary_out['speedup']:.2f}x (against {base_name}"
              + (", the faster plain variant" if len(plains) > 1 else "") + ")")
        for k in plains:
            if k != base_name:
                print(f"  (against {k}: {summary_out['speedup_vs'][k]:.2f}x)")
        print(f"  eval loss, lorasweep minus plain, paired by seed: {statistics.mean(diffs):+.4f} "
              + (f"± {half:.4f} (95% t)" if len(diffs) > 1 else "(one seed: no interval; --repeats 2 or more)"))
    for name in recipes:
        rss = max(r.get("peak_rss_bytes") or 0 for r in results[name]) / 2**30
        summary_out.setdefault("peak_rss_gib", {})[name] = rss
        print(f"  peak RSS {name:28s}: {rss:6.2f} GiB (whole process, highest since its model "
              "was loaded; memory earlier recipes left to the allocator counts too)")
        if "peak_cuda_allocated_bytes" in results[name][0]:
            peak = max(r["peak_cuda_allocated_bytes"] for r in results[name]) / 2**30
            res = max(r["peak_cuda_reserved_bytes"] for r in results[name]) / 2**30
            summary_out.setdefault("peak_cuda_gib", {})[name] = {"allocated": peak, "reserved": res}
            print(f"  peak CUDA memory {name:20s}: {peak:6.2f} GiB allocated, {res:6.2f} GiB reserved "
                  "(from the loaded model on)")
    if a.host_reads:
        print("  tensor values read by the host per training step (each a wait for the GPU), first seed:")
        for name in recipes:
            per_step = results[name][0]["host_reads_per_step"]
            print(f"    {name:24s}: {sum(per_step.values()):5.2f}")
            for site, n in sorted(per_step.items(), key=lambda kv: -kv[1]):
                print(f"      {n:5.2f}  {site}")
        print("  (rates above were measured with every torch call intercepted: not the recipes' own)")
    gpu = summary_out["hardware"]
    if speed.peak_flops(gpu):  # a GPU whose peak is known
        for name in recipes:  # each recipe's model as it trained (the same architecture and adapter shape)
            run0 = results[name][0]
            u = speed.mfu(run0["params"], run0["trainable"], med[name], gpu, half=run0["precision"] in ("bf16", "fp16"),
                          **run0["flop_shape"])
            if u is not None:
                summary_out.setdefault("mfu", {})[name] = u
                print(f"  MFU {name:20s}: {u:.1%} of {gpu}'s {speed.peak_flops(gpu) / 1e12:.0f} TFLOP/s 16-bit peak")
        # both recipes feed the same examples per step, so one bound (lorasweep's run records it) holds for both
        ours = next((r[0] for r in results.values() if r and "mfu_ceiling_pct" in r[0]), None)
        if ours:
            summary_out["mfu_bound"] = {k: ours[k] for k in BOUND}
            print(f"  bound at {ours['tokens'] / ours['steps']:,.0f} tokens a step: "
                  f"{ours['mfu_ceiling_pct']:.1f}% MFU, {ours['tokens_per_s_ceiling']:,.0f} tokens/s (a step takes at "
                  f"least {ours['step_floor_ms']:.2f} ms, {ours['step_floor_memory_ms']:.2f} ms of it moving weights "
                  "and optimizer state; lorasweep.speed.step_ceiling)")
    if a.json:
        write_benchmark_json(a.json, summary_out, __file__, argv, a.device)
    return summary_out


if __name__ == "__main__":
    main()
