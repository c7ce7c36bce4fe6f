"""The memory model's prediction for each run, before any training: weights, AdamW state, what autograd keeps.

    python benchmarks/predict_memory.py --shape opt-350m --runs lora-r8 qlora-r8 --batch 8 --length 512 \
        --precision bf16 --frozen-16bit both

Builds the OPT of ``--shape`` with random weights (the tiny preset's, or facebook/opt-350m's architecture), or takes
``--model`` (a local directory or hub id: your model, before you train it), loads each run as lorasweep trains it (QLoRA 4-bit, LoRA on the attention projections, TRL's fused LM head) and calls
``lorasweep.memory_model.predict`` on it, as every training run does after training: the probe batches run on the
CPU, under bf16 autocast with ``--precision bf16``. ``--frozen-16bit both`` predicts each adapter run twice, with
``training.frozen_weights_16bit`` on (LoRA's frozen base stored in 16 bits, QLoRA's 4-bit layers fed 16 bits) and
off. On the CPU the chunked loss's working memory is its torch fallback's (``predicted_loss_work_bytes``, larger
than on CUDA); the other components do not depend on the device.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def predict_run(model, work: Path, run: str, batch: int, length: int, precision: str, frozen_16bit: bool) -> dict:
    """The memory model's prediction for ``run`` on ``model`` (a directory or hub id), as lorasweep trains it."""
    from trl.trainer.utils import add_fused_lm_head

    from lorasweep.config import run_spec
    from lorasweep.memory_model import predict
    from lorasweep.speed import single_run_config
    from lorasweep.train import attach_lora, frozen_base_16bit, load_model

    data = work / "one.jsonl"  # the config needs a dataset; nothing reads it here
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = single_run_config(str(model), data, run, lr=1e-4, device="cpu", seed=0, precision=precision)
    spec = run_spec(cfg, run)
    model = load_model(spec, "cpu", precision)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # SFTTrainer's loss, as lorasweep trains
    if spec["lora"]:
        model = attach_lora(model, spec)
        if frozen_16bit:
            frozen_base_16bit(model, precision)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return predict(model, trainable, batch, length, precision, fused_loss=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "opt-350m"])
    ap.add_argument("--model", help="a model directory or hub id to predict for instead of a --shape built here")
    ap.add_argument("--runs", nargs="+", default=["full", "lora-r8", "qlora-r8"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--frozen-16bit", default="on", choices=["on", "off", "both"],
                    help="training.frozen_weights_16bit for the adapter runs (both: each run twice)")
    ap.add_argument("--json", help="write the predictions here")
    a = ap.parse_args(argv)

    from lorasweep.tiny import OPT_350M_SHAPE, random_opt

    shape = dict(OPT_350M_SHAPE) if a.shape == "opt-350m" else {"max_positions": max(512, a.length)}
    vocab = shape.pop("vocab_size", 1024)
    settings = {"on": [True], "off": [False], "both": [True, False]}[a.frozen_16bit]
    what = a.model or f"OPT of the {a.shape} shape"
    out = {"model": what, "batch": a.batch, "length": a.length, "precision": a.precision, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model or Path(tmp) / "model"
        if not a.model:
            random_opt(vocab, **shape).save_pretrained(model_dir)
        for run in a.runs:
            for on in settings if run != "full" else [True]:
                name = run if on else f"{run}, frozen_weights_16bit off"
                out["runs"][name] = predict_run(model_dir, Path(tmp), run, a.batch, a.length, a.precision, on)
    gib = 2 ** 30
    print(f"predicted bytes, {what}, batch {a.batch} x {a.length} tokens, {a.precision} "
          "(GiB: weights, AdamW state, kept for the backward pass, loss working memory, peak):")
    for name, p in out["runs"].items():
        print(f"  {name:36s} {p['predicted_weights_bytes'] / gib:7.3f} {p['predicted_optimizer_bytes'] / gib:7.3f} "
              f"{p['predicted_saved_for_backward_bytes'] / gib:7.3f} {p['predicted_loss_work_bytes'] / gib:7.3f} "
              f"{p['predicted_peak_bytes'] / gib:7.3f}")
    if a.json:
        from lorasweep.provenance import write_benchmark_json

        write_benchmark_json(a.json, out, __file__, argv)
    return out


if __name__ == "__main__":
    main()
