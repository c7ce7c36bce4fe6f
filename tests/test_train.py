"""Real training steps on the tiny model: no mocked trainer anywhere."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorasweep.config import run_spec
from lorasweep.train import NoGPUError, resolve_device, train_run
from lorasweep.trainer import TokenCounts


def _train(tiny_config, tiny_data, tmp_path, run, **training):
    from lorasweep.config import operational

    cfg = tiny_config(**training)
    out = tmp_path / run
    metrics = train_run(run_spec(cfg, run), tiny_data["train"], tiny_data["eval"], out,
                        data_summary_path=tiny_data["summary"], threads=2, operational=operational(cfg))
    return metrics, out


def test_full_finetuning_learns_and_writes_everything(tiny_config, tiny_data, tmp_path):
    m, out = _train(tiny_config, tiny_data, tmp_path, "full", max_steps=20, evals=3)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m, default=str))
    assert m["eval_loss"] < m["base_eval_loss"] - 0.5  # the loss really falls
    assert m["train_steps"] == 20 and m["train_samples"] == 20 * 8
    assert m["trainable_params"] == m["total_params"] and m["saved_model_kind"] == "full model"
    assert (out / "model" / "model.safetensors").stat().st_size == m["saved_model_bytes"]
    assert 0 < m["train_runtime_s"] <= m["train_wall_s"]
    assert m["checkpoint_time_s"] == 0  # checkpoint_steps 200 > 20 steps, and none of the finished run
    assert m["peak_rss_bytes"] > 0 and "peak_cuda_allocated_bytes" not in m  # absent on the CPU, never 0
    # the footprint before the model loaded (the tiny model's 0.8 MB can vanish in the allocator's noise)
    assert 0 < m["rss_before_load_bytes"] <= m["peak_rss_bytes"]
    assert "mfu_pct" not in m and "mfu_ceiling_pct" not in m  # GPU figures
    assert m["train_tokens_labelled"] < m["train_tokens_nonpad"] <= m["train_tokens_padded"]
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    # TRL's token count (positions per row once batches come without their mask) is replaced by lorasweep's
    logged = [h for h in history if "num_tokens" in h]
    assert logged and all(h["num_tokens"] == h["tokens_nonpad_seen"] for h in logged)
    evals = [h for h in history if "eval_loss" in h]
    # one record per evaluation (untrained, then every eval_steps); the curves end where the metrics say
    assert [h["step"] for h in evals] == sorted({h["step"] for h in evals}) and evals[0]["step"] == 0
    assert [h["step"] for h in evals] == [0, 7, 14, 20]  # evals: 3 during training, the last at the end
    assert evals[0]["eval_loss"] == pytest.approx(m["base_eval_loss"])
    assert evals[-1]["step"] == 20 and evals[-1]["eval_loss"] == pytest.approx(m["eval_loss"])
    # the reported eval loss counts every response token of the eval split once (not a mean of batch means)
    per_example = json.loads((out / "eval_losses.json").read_text())
    for which, key in (("final", "eval_loss"), ("base", "base_eval_loss")):
        rows = per_example[which]
        assert m[key] == pytest.approx(sum(r["loss_sum"] for r in rows) / sum(r["tokens"] for r in rows))
    assert abs(m["eval_loss"] - m["eval_loss_batch_mean"]) < 0.1  # close, but not the same measure
    assert m["eval_loss"] != m["eval_loss_batch_mean"]
    # TRL's training metrics stay in the training records (an evaluation does not take them over)
    assert all("mean_token_accuracy" in h for h in history if "loss" in h)
    assert not any("mean_token_accuracy" in h for h in evals)
    assert sum(1 for h in history if "loss" in h) == 10
    meta = m["meta_info"]
    assert meta["packages"]["transformers"] and meta["hardware"]["device"] == "cpu"
    assert m["run_info"]["spec"]["run"] == "full" and len(m["data_fingerprint_sha256"]) == 64


def test_how_often_a_run_evaluates_does_not_change_what_it_learns(tiny_config, tiny_data, tmp_path, caplog):
    """Evaluations leave the random state as they found it: LoRA's dropout masks, and so its training, are the
    same whether it evaluates once or after every few steps. ``evals`` the steps cannot give at a whole-step
    interval (8 steps, 6 evaluations: every 2 steps, 4 of them) is said in the log, with the count it gets."""
    import logging

    losses = {}
    for evals, made in ((1, 1), (4, 4), (6, 4)):
        with caplog.at_level(logging.WARNING, logger="lorasweep"):
            caplog.clear()
            _, out = _train(tiny_config, tiny_data, tmp_path / f"evals{evals}", "lora-r8", max_steps=8, evals=evals,
                            logging_steps=1)
        history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
        losses[evals] = [h["loss"] for h in history if "loss" in h]
        assert sum(1 for h in history if "eval_loss" in h) == 1 + made
        said = f"training.evals = {evals}: {made} evaluations, every 2 steps of 8" in caplog.text
        assert said == (made != evals), caplog.text
    assert len(losses[1]) == 8 and losses[1] == losses[4] == losses[6]


def test_lora_trainable_params_match_formula_and_peft_loader(tiny_config, tiny_data, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m, out = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    targets = {"q_proj", "k_proj", "v_proj"}
    expected = sum(8 * (mod.in_features + mod.out_features) for name, mod in base.named_modules()
                   if name.rsplit(".", 1)[-1] in targets)
    assert m["trainable_params"] == expected
    loaded = PeftModel.from_pretrained(base, out / "model", is_trainable=True)
    trainable, total = loaded.get_nb_trainable_parameters()
    assert (trainable, total) == (m["trainable_params"], m["total_params"])
    assert m["saved_model_kind"] == "adapter" and (out / "model" / "adapter_model.safetensors").is_file()


def test_qlora_really_trains_a_4bit_base(tiny_config, tiny_data, tmp_path):
    import bitsandbytes as bnb

    from lorasweep.train import load_model

    m, out = _train(tiny_config, tiny_data, tmp_path, "qlora-r8", max_steps=6)
    assert m["eval_loss"] < m["base_eval_loss"]
    spec = run_spec(tiny_config(), "qlora-r8")
    model = load_model(spec, "cpu", "fp32")
    layers = [mod for mod in model.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    # every decoder Linear (q, k, v, out_proj, fc1, fc2 of 2 layers) is 4-bit; lm_head stays in full precision
    assert len(layers) == m["quantized_4bit_layers"] == 12
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert layers and all(layer.weight.dtype == torch.uint8 for layer in layers)
    assert layers[0].weight.quant_state.quant_type == "nf4"
    # a packed 4-bit weight counts as the weights it represents, so totals match the LoRA run's
    lora, _ = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=1)
    assert m["total_params"] == lora["total_params"] and m["trainable_params"] == lora["trainable_params"]
    assert m["quantized_params"] == sum(layer.in_features * layer.out_features for layer in layers)
    assert lora["quantized_params"] == 0


def test_qlora_with_gradient_checkpointing_calls_no_deprecated_checkpointing_api(tiny_config, tiny_data, tmp_path):
    """PEFT's prepare_model_for_kbit_training(use_gradient_checkpointing=True) enabled checkpointing through
    transformers 5's deprecated gradient_checkpointing_enable (a FutureWarning in every such QLoRA job's log, removed
    in v6), before the Trainer enabled it again through activation_checkpointing_enable: the Trainer's alone now,
    checkpointing still on at every step."""
    import importlib
    import warnings

    from transformers import TrainerCallback

    from lorasweep.logs import EXPECTED_WARNINGS

    class Checkpointing(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.seen.append(model.get_base_model().is_activation_checkpointing)

    for library in ("bitsandbytes", "peft", "trl"):  # imported before the record: torch's DeprecationWarning on import
        importlib.import_module(library)
    cfg = tiny_config(max_steps=2, evals=1, gradient_checkpointing=True)
    cb = Checkpointing()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = train_run(run_spec(cfg, "qlora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "qlora-r8",
                      threads=2, callbacks=[cb])
    assert m["gradient_checkpointing"] is True and cb.seen == [True, True]
    deprecated = {str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
                  and not any(issubclass(w.category, category) and str(w.message).startswith(start)
                              for category, _, start in EXPECTED_WARNINGS)}
    assert not deprecated, deprecated


def test_qlora_loads_the_configured_4bit_format(tiny_config):
    """methods.qlora.quant_type and double_quant reach bitsandbytes, in training's model and in the 4-bit base
    the merge dequantizes: the metrics name the format that was set, so the layers must hold that format."""
    import bitsandbytes as bnb

    from lorasweep.adapters import load_base
    from lorasweep.train import load_model

    for quant_type, double in (("fp4", True), ("nf4", False)):
        cfg = tiny_config()
        cfg["methods"]["qlora"].update(quant_type=quant_type, double_quant=double)
        spec = run_spec(cfg, "qlora-r8")
        for model in (load_model(spec, "cpu", "fp32"), load_base(spec, quantized=True)):
            states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            assert len(states) == 12
            assert {s.quant_type for s in states} == {quant_type} and {s.nested for s in states} == {double}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_16bit_frozen_base_trains_bitwise_as_the_fp32_one(tiny_config, tiny_data, tmp_path, dora):
    """training.frozen_weights_16bit: with bf16 autocast a LoRA run's frozen linear weights are stored in bf16
    instead of being cast to it at every product. The same losses, gradient norms, eval losses (every example)
    and adapter, to the bit; the embedding (tied to the LM head), layer norms and the adapter stay fp32. With
    DoRA, the layers it adapts keep their base in fp32 (DoRA's norm reads it) and the others go 16-bit."""
    from safetensors.torch import load_file

    runs = {}
    cfg = tiny_config(max_steps=6, precision="bf16")
    cfg["methods"]["lora"]["use_dora"] = dora
    spec = run_spec(cfg, "lora-r8-dora" if dora else "lora-r8")
    for on in (True, False):
        out = tmp_path / str(on)
        m = train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2,
                      operational={"frozen_weights_16bit": on})  # an operational setting: not in the run's spec
        runs[on] = (m, [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()],
                    load_file(out / "model" / "adapter_model.safetensors"))
    (m16, log16, adapter16), (m32, log32, adapter32) = runs[True], runs[False]
    # 2 layers x 6 linear layers (q, k, v, out_proj, fc1, fc2), weights and biases; nothing else (DoRA: not q, k, v)
    from lorasweep.train import load_model

    base = load_model(spec, "cpu", "fp32")
    adapted = ("q_proj", "k_proj", "v_proj") if dora else ()
    linear = sum(p.numel() for name, mod in base.named_modules() if type(mod) is torch.nn.Linear and name != "lm_head"
                 and not name.endswith(adapted) for p in mod.parameters())
    assert m16["frozen_16bit_params"] == linear > 0 and m32["frozen_16bit_params"] == 0
    assert m16["total_params"] == m32["total_params"] and m16["trainable_params"] == m32["trainable_params"]
    # the memory model sees half the bytes for those weights, and no 16-bit copies of them kept for the backward
    assert m32["predicted_weights_bytes"] - m16["predicted_weights_bytes"] == 2 * linear
    if not dora:  # DoRA converts only out_proj, fc1, fc2 here: their copies are within the probe fit's resolution
        assert m16["predicted_saved_for_backward_bytes"] < m32["predicted_saved_for_backward_bytes"]
    losses = [(h.get("loss"), h.get("grad_norm"), h.get("eval_loss")) for h in log16]
    assert losses == [(h.get("loss"), h.get("grad_norm"), h.get("eval_loss")) for h in log32]
    assert sum(1 for loss, _, _ in losses if loss is not None) >= 3
    assert m16["eval_loss"] == m32["eval_loss"] and m16["base_eval_loss"] == m32["base_eval_loss"]
    assert m16["eval_loss"] != m16["base_eval_loss"]  # it trained
    assert adapter16.keys() == adapter32.keys() and all(torch.equal(adapter16[k], adapter32[k]) for k in adapter16)
    assert {t.dtype for t in adapter16.values()} == {torch.float32}


def test_gpt2s_conv1d_frozen_base_goes_16bit_and_trains_bitwise_as_the_fp32_one(tiny_config, tiny_data, tiny_gpt2,
                                                                                  tmp_path):
    """GPT-2's linear layers are transformers' Conv1D, not nn.Linear: under bf16 training their frozen weights
    are stored in bf16 too (they stayed fp32: frozen_16bit_params 0), with the same losses, to the bit."""
    from transformers.pytorch_utils import Conv1D

    from lorasweep.train import load_model

    cfg = tiny_config(max_steps=4, precision="bf16")
    cfg["model"]["name_or_path"] = str(tiny_gpt2)
    spec = run_spec(cfg, "lora-r8")
    runs = {}
    for on in (True, False):
        out = tmp_path / str(on)
        m = train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2,
                      operational={"frozen_weights_16bit": on})
        runs[on] = m, [(h.get("loss"), h.get("grad_norm"), h.get("eval_loss"))
                       for h in map(json.loads, (out / "log_history.jsonl").read_text().splitlines())]
    base = load_model(spec, "cpu", "fp32")
    conv1d = sum(p.numel() for mod in base.modules() if type(mod) is Conv1D for p in mod.parameters())
    assert conv1d > 0 and runs[True][0]["frozen_16bit_params"] == conv1d  # c_attn (adapted), c_proj, c_fc
    assert runs[False][0]["frozen_16bit_params"] == 0
    assert runs[True][1] == runs[False][1] and sum(1 for loss, _, _ in runs[True][1] if loss is not None) >= 2
    assert runs[True][0]["eval_loss"] == runs[False][0]["eval_loss"]


def test_lora_on_gpt2s_conv1d_asks_peft_for_fan_in_fan_out(tiny_config, tiny_data, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D stores its weight [in, out]: PEFT turned fan_in_fan_out on itself, with a UserWarning in the
    training job's log. Asked for it, it trains and saves the same; an OPT's nn.Linear targets keep it off."""
    import warnings

    from lorasweep.train import attach_lora, load_model

    cfg = tiny_config(max_steps=1, evals=1)
    cfg["model"]["name_or_path"] = str(tiny_gpt2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "gpt2", threads=2)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)], [str(w.message) for w in caught]
    saved = json.loads(next((tmp_path / "gpt2").rglob("adapter_config.json")).read_text())
    assert saved["fan_in_fan_out"] is True and saved["target_modules"] == ["c_attn"]
    opt = run_spec(tiny_config(), "lora-r8")
    assert attach_lora(load_model(opt, "cpu", "fp32"), opt).peft_config["default"].fan_in_fan_out is False


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_qlora_trains_bitwise_as_lora_over_its_dequantized_base(tiny_config, targets, precision):
    """With 16-bit autocast (bf16; fp16 on older GPUs), QLoRA's 4-bit layers take and return 16 bits
    (feed_4bit_layers_16bit), so qlora-r8 is lora-r8 over the dequantized weights, to the bit: losses, gradient
    norms and the adapter after training. On bitsandbytes' own terms (output in its input's dtype: fp32 after a
    layer norm) the sums of base and adapter that reach the fp32 residual stream (out_proj, fc2: all-linear) kept
    fp32 digits LoRA's 16-bit products do not have: quantization was not the only difference. (The attention case
    holds without the feeding too: the sums of q/k/v are rounded to 16 bits before attention either way. all-linear
    is the one that needs it.)"""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    from lorasweep.train import attach_lora, feed_4bit_layers_16bit, load_model, store_frozen_weights_16bit

    cfg = tiny_config()
    cfg["methods"]["lora"]["target_modules"] = targets
    q_spec, l_spec = run_spec(cfg, "qlora-r8"), run_spec(cfg, "lora-r8")
    assert l_spec["lora"]["dropout"] > 0  # the adapter's branch keeps its own (fp32) input, as in LoRA
    qlora = load_model(q_spec, "cpu", precision)
    four_bit = {name: mod for name, mod in qlora.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
    lora = load_model(l_spec, "cpu", "fp32")
    for name, mod in lora.named_modules():
        if name in four_bit:  # the values the 4-bit layer computes with
            w = four_bit[name].weight
            mod.weight.data = bnbf.dequantize_4bit(w.data, w.quant_state).float()
    assert len(four_bit) == 12
    qlora, lora = attach_lora(qlora, q_spec), attach_lora(lora, l_spec)
    q_params = dict(qlora.named_parameters())
    for name, p in lora.named_parameters():  # the same adapter initialisation (bitsandbytes' layers draw otherwise)
        if p.requires_grad:
            p.data.copy_(q_params[name].data)
    assert store_frozen_weights_16bit(lora, precision) > 0
    assert feed_4bit_layers_16bit(qlora, precision) == 12 and feed_4bit_layers_16bit(lora, precision) == 0
    # dequantized straight to 16 bits for the backward product (bitsandbytes: to fp32, the loading dtype, then cast)
    assert {m.weight.quant_state.dtype for m in four_bit.values()} == {half}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 500, (4, int(n)), generator=g) for n in torch.randint(16, 64, (4,), generator=g)]
    runs = {}
    for name, model in (("qlora", qlora), ("lora", lora)):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-3)
        torch.manual_seed(1)  # the same dropout masks
        steps = []
        for ids in batches:
            with torch.autocast("cpu", dtype=half):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            steps.append((loss.item(), torch.nn.utils.clip_grad_norm_(params, 1.0).item()))
            opt.step()
            opt.zero_grad()
        runs[name] = steps, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (q_steps, q_adapter), (l_steps, l_adapter) = runs["qlora"], runs["lora"]
    assert q_steps == l_steps
    assert q_adapter.keys() == l_adapter.keys() and all(torch.equal(q_adapter[n], l_adapter[n]) for n in q_adapter)
    assert q_steps[0][0] != q_steps[-1][0]  # it trained


def test_4bit_layers_are_fed_16bit_only_under_autocast(tmp_path):
    """opt-350m projects out of its decoder (project_out, 4-bit in QLoRA) into its fp32 LM head: outside autocast
    (generation, a plain forward) the hook stands aside and the model computes as bitsandbytes leaves it; under
    autocast every 4-bit layer returns bf16."""
    import bitsandbytes as bnb

    from lorasweep.tiny import random_opt
    from lorasweep.train import feed_4bit_layers_16bit, load_model

    random_opt(500, hidden_size=64, word_embed_proj_dim=32).save_pretrained(tmp_path / "m")
    model = load_model({"model": {"name_or_path": str(tmp_path / "m"), "trust_remote_code": False},
                        "quantization": {"quant_type": "nf4", "double_quant": False}}, "cpu", "bf16")
    assert feed_4bit_layers_16bit(model, "bf16") == 2 * 6 + 2  # q, k, v, out_proj, fc1, fc2; project_in / _out
    dtypes = []
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.float32
        assert len(dtypes) == 14 and set(dtypes) == {torch.float32}
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        assert len(dtypes) == 14 and set(dtypes) == {torch.bfloat16}


def test_qlora_with_16bit_outputs_keeps_16bit_activations_and_trains_as_before(tiny_config, tiny_data, tmp_path):
    """training.frozen_weights_16bit also feeds QLoRA's 4-bit layers 16-bit inputs: the activations after them are
    kept in bf16, not fp32 (the memory model counts what LoRA's run keeps), and on the tiny preset's attention
    targets nothing rounds differently, so training is bitwise the same (every logged loss, gradient norm and eval
    loss)."""
    spec = run_spec(tiny_config(max_steps=6, precision="bf16"), "qlora-r8")
    runs = {}
    for on in (True, False):
        out = tmp_path / str(on)
        m = train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2,
                      operational={"frozen_weights_16bit": on})
        runs[on] = m, [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    (m16, log16), (m32, log32) = runs[True], runs[False]
    assert m16["four_bit_16bit_layers"] == 12 and m32["four_bit_16bit_layers"] == 0
    assert m16["frozen_16bit_params"] == m32["frozen_16bit_params"] == 0  # its base is 4-bit: nothing else to store
    # what autograd keeps for the backward pass: what lora-r8 keeps (fc1's 4x-wide output in bf16), 17% less here
    lora = train_run(run_spec(tiny_config(max_steps=1, precision="bf16"), "lora-r8"), tiny_data["train"],
                     tiny_data["eval"], tmp_path / "lora", threads=2)
    saved = "predicted_saved_for_backward_bytes"
    assert m16[saved] == lora[saved] < 0.85 * m32[saved]
    losses = [(h.get("loss"), h.get("grad_norm"), h.get("eval_loss")) for h in log16]
    assert losses == [(h.get("loss"), h.get("grad_norm"), h.get("eval_loss")) for h in log32]
    assert m16["eval_loss"] == m32["eval_loss"] and m16["eval_loss"] < m16["base_eval_loss"]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_16bit_frozen_base_on_the_cpu_lets_the_memory_mapped_checkpoint_go(tiny_config, tiny_model, tmp_path):
    """On the CPU the loaded checkpoint stays memory-mapped while a weight points into it, and its pages count in
    the RSS: after the conversion nothing may point into it, or the RSS holds the fp32 file beside the copies."""
    import gc
    import shutil

    from lorasweep.train import attach_lora, load_model, store_frozen_weights_16bit

    own = shutil.copytree(tiny_model, tmp_path / "model")  # a path no other test's model maps
    cfg = tiny_config()
    cfg["model"]["name_or_path"] = str(own)
    spec = run_spec(cfg, "lora-r8")

    def mapped():
        gc.collect()
        return str(own) in Path("/proc/self/maps").read_text()

    model = attach_lora(load_model(spec, "cpu", "bf16"), spec)
    assert mapped()  # what the conversion has to undo
    assert store_frozen_weights_16bit(model, "bf16") > 0
    assert not mapped()
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_only_frozen_unshared_linear_weights_go_16bit(tiny_config):
    """What store_frozen_weights_16bit leaves alone: fp32 training, trainable weights (full fine-tuning),
    QLoRA's 4-bit layers, and the LM head shared with the token embedding."""
    import bitsandbytes as bnb

    from lorasweep.train import attach_lora, load_model, store_frozen_weights_16bit

    spec = run_spec(tiny_config(), "lora-r8")
    lora = attach_lora(load_model(spec, "cpu", "bf16"), spec)
    assert store_frozen_weights_16bit(lora, "fp32") == 0
    assert {p.dtype for p in lora.parameters()} == {torch.float32}
    assert store_frozen_weights_16bit(lora, "bf16") > 0
    for name, p in lora.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad or "layer_norm" in name or "embed" in name
                           else torch.bfloat16), name
    assert lora.get_output_embeddings().weight.dtype == torch.float32
    full = load_model(run_spec(tiny_config(), "full"), "cpu", "bf16")
    assert store_frozen_weights_16bit(full, "bf16") == 0
    cfg = tiny_config()
    cfg["methods"]["lora"]["use_dora"] = True  # DoRA's norm reads the base weight in fp32: its layers' bases stay
    spec = run_spec(cfg, "lora-r8-dora")
    dora = attach_lora(load_model(spec, "cpu", "bf16"), spec)
    assert store_frozen_weights_16bit(dora, "bf16") > 0
    for name, p in dora.named_parameters():
        dora_base = ".base_layer." in name and any(f".{t}." in name for t in ("q_proj", "k_proj", "v_proj"))
        assert p.dtype == (torch.float32 if p.requires_grad or dora_base or "layer_norm" in name or "embed" in name
                           else torch.bfloat16), name
    spec = run_spec(tiny_config(), "qlora-r8")
    qlora = attach_lora(load_model(spec, "cpu", "bf16"), spec)
    before = {name: (p.dtype, p.data_ptr()) for name, p in qlora.named_parameters()}
    store_frozen_weights_16bit(qlora, "bf16")
    four_bit = [name for name, mod in qlora.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert four_bit
    for name, p in qlora.named_parameters():
        if any(name.startswith(layer + ".") for layer in four_bit) and "lora_" not in name:
            assert (p.dtype, p.data_ptr()) == before[name], name


def test_token_counts_on_hand_built_batches():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]),
    }
    counts = TokenCounts()
    counts.add(batch)
    first = counts.read()
    assert first == {"tokens_padded": 10, "tokens_nonpad": 8, "tokens_labelled": 5, "samples": 2, "max_seq_len": 5}
    prompt_tokens = 1 + 2  # fed, but without a label
    assert first["tokens_nonpad"] == first["tokens_labelled"] + prompt_tokens
    assert counts.read() == first  # reading twice counts nothing twice
    # a padding-free batch (no attention mask: every position is real), added to the counts of a resumed run
    resumed = TokenCounts(first)
    resumed.add({"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), "labels": torch.tensor([[-100] * 4 + [5, 6, 7]])})
    resumed.add(batch)
    assert resumed.read() == {"tokens_padded": 27, "tokens_nonpad": 23, "tokens_labelled": 13, "samples": 5,
                              "max_seq_len": 7}


def test_the_training_step_reads_no_tensor_values_and_logs_what_trls_own_step_logs(tiny_config, tiny_data, tmp_path,
                                                                                   monkeypatch):
    """Every tensor value Python reads in a training step is a wait for the GPU. lorasweep's token counting
    and the Trainer's per-step token count and NaN filter read three to four a step, transformers' check of the
    attention mask two, TRL's loss metrics five; none may be left. TRL's own step (DEFER_LOSS_METRICS off) is
    counted too, so the check cannot pass by counting nothing, and lorasweep's must log the same values. The
    Trainer's own per-step walks over the model (SKIP_MODULE_WALKS off) give the same gradient norms and
    ``total_flos`` as lorasweep's shortcuts, which count the parameters once."""
    from transformers import PreTrainedModel, TrainerCallback

    import lorasweep.trainer as lt
    from lorasweep.speed import HostReads

    class Flos(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            self.total = state.total_flos

    walks = {"count": 0, "on": False}
    count_parameters = PreTrainedModel.num_parameters

    def counted(self, *a, **k):
        walks["count"] += walks["on"]
        return count_parameters(self, *a, **k)

    class Steps(TrainerCallback):  # counts the parameter walks between a step's start and its end
        def on_step_begin(self, args, state, control, **kw):
            walks["on"] = True

        def on_step_end(self, args, state, control, **kw):
            walks["on"] = False

    monkeypatch.setattr(PreTrainedModel, "num_parameters", counted)
    steps, runs, flos = 8, {}, {}
    for defer in (False, True):
        monkeypatch.setattr(lt, "DEFER_LOSS_METRICS", defer)
        monkeypatch.setattr(lt, "SKIP_MODULE_WALKS", defer)
        flos[defer], walks["count"] = Flos(), 0
        with HostReads() as reads:
            spec = run_spec(tiny_config(max_steps=steps, evals=1, logging_steps=2), "lora-r8")
            out = tmp_path / str(defer)
            train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2, callbacks=[flos[defer], Steps()])
        history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
        runs[defer] = reads.in_steps(), [h for h in history if "loss" in h], walks["count"]
    assert runs[False][2] >= steps and runs[True][2] == 1  # the Trainer counts parameters every step; here once
    assert flos[True].total == flos[False].total > 0
    trls, ours = runs[False][0], runs[True][0]
    assert sum(n for site, n in trls.items() if site.startswith("trl/")) >= 5 * steps  # the counting works
    # nothing read back inside a step (TRL's metrics are read at the training logs), but for the Trainer's
    # total loss once a run, after the last step
    assert sum(ours.values()) <= 1 and all(site.startswith("transformers/trainer.py") for site in ours), ours
    keys = ("step", "loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "learning_rate")
    assert len(runs[True][1]) == steps // 2 and all(set(keys) <= set(h) for h in runs[True][1])
    for theirs, mine in zip(runs[False][1], runs[True][1], strict=True):
        assert {k: mine[k] for k in keys} == pytest.approx({k: theirs[k] for k in keys}, rel=1e-6, abs=1e-7)
    # right-padded batches go in without their attention mask, so transformers never checks it for padding
    assert not any(site.startswith("transformers/masking_utils.py") for site in trls), trls


def test_cuda_requested_without_gpu_stops_with_guidance():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(NoGPUError) as err:
        resolve_device("cuda")
    assert "config/tiny.yaml" in str(err.value) and "training.device" in str(err.value)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it(monkeypatch):
    """torch's is_bf16_supported() also says yes where bf16 is emulated (V100, T4); there `auto` means fp16."""
    from lorasweep.train import resolve_precision

    def bf16(including_emulation=True, emulated=True):  # what torch answers on a GPU without bf16 units
        return emulated and including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    assert resolve_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cuda") == "bf16"


def test_unknown_target_module_is_caught_against_the_model(tiny_config, tiny_data, tmp_path):
    from lorasweep.config import ConfigError

    cfg = tiny_config()
    cfg["methods"]["lora"]["target_modules"] = ["q_proj", "query_key_value"]
    spec = run_spec(cfg, "lora-r8")
    with pytest.raises(ConfigError, match=r"\['query_key_value'\] not found in OPTForCausalLM"):
        train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "x")
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_a_tokenizer_without_eos_or_pad_stops_before_the_data_naming_the_model(tiny_config, tiny_data, tiny_model,
                                                                             tmp_path):
    """Training pads with EOS where a tokenizer has no pad token, and TRL ends every response with EOS: a tokenizer
    with neither failed in TRL (``pad_token ('None') is not found in the vocabulary``), after the data step."""
    import shutil

    from transformers import AutoTokenizer

    from lorasweep.config import ConfigError

    model_dir = tmp_path / "no-eos"
    shutil.copytree(tiny_model, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token = None
    tok.save_pretrained(model_dir)
    cfg = tiny_config(max_steps=1, evals=1)
    cfg["model"]["name_or_path"] = str(model_dir)
    with pytest.raises(ConfigError, match=r"model.name_or_path = '.*no-eos': its tokenizer has no EOS token and no "
                                          r"pad token"):
        train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2)
    assert not (tmp_path / "run" / "log_history.jsonl").exists()


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_a_max_length_beyond_the_models_positions_stops_before_training_naming_the_setting(
        arch, tiny_config, tiny_data, tiny_model, tmp_path):
    """GPT-2 with n_positions 64 and max_length 128 failed in its first batch (IndexError: index out of range in
    self); the limit is the config's n_positions (GPT-2) or max_position_embeddings (OPT's, Llama's, ...)."""
    from conftest import build_tiny_gpt2

    from lorasweep.config import ConfigError

    cfg = tiny_config(max_steps=1, evals=1, max_length=128 if arch == "gpt2" else 513)
    if arch == "gpt2":
        cfg["model"]["name_or_path"] = str(build_tiny_gpt2(tiny_model, tmp_path / "gpt2-64", n_positions=64))
    key, limit = ("n_positions", 64) if arch == "gpt2" else ("max_position_embeddings", 512)
    with pytest.raises(ConfigError, match=rf"training.max_length = {cfg['training']['max_length']} is more than "
                                          rf"model.name_or_path = .* takes: its config's {key} is {limit}"):
        train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2)
    assert not (tmp_path / "run" / "log_history.jsonl").exists()
    cfg["training"]["max_length"] = limit  # as many as it has: trains
    m = train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "ok", threads=2)
    assert m["max_length"] == limit and m["train_steps"] == 1


def test_a_pad_to_multiple_of_that_pads_past_the_models_positions_stops_before_training(tiny_config, tiny_data,
                                                                                       tmp_path):
    """training.pad_to_multiple_of pads a batch up past max_length: max_length 512 (the tiny OPT's positions) with a
    multiple of 384 pads the longest batches to 768, and the first of them failed in the position embedding
    (IndexError: index out of range in self), possibly hours into a run; the check names both settings."""
    from lorasweep.config import ConfigError, operational

    cfg = tiny_config(max_steps=2, evals=1, max_length=512, pad_to_multiple_of=1000)  # every batch padded to 1000
    spec = run_spec(cfg, "lora-r8")
    with pytest.raises(ConfigError, match=r"training.pad_to_multiple_of = 1000 pads a batch of training.max_length = "
                                          r"512 tokens to 1000, more than .* max_position_embeddings is 512"):
        train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2,
                  operational=operational(cfg))
    assert not (tmp_path / "run" / "log_history.jsonl").exists()
    cfg = tiny_config(max_steps=1, evals=1, max_length=500, pad_to_multiple_of=256)  # 500 -> 512: fits
    m = train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "ok", threads=2,
                  operational=operational(cfg))
    assert m["train_steps"] == 1 and m["pad_to_multiple_of"] == 256


def test_a_max_length_that_leaves_no_example_stops_naming_the_setting(tiny_config, tiny_data, tmp_path):
    """max_length 16 (the schema's least) is shorter than every prompt: TRL drops every example, and training failed
    in the sampler (IndexError: Invalid key: 0 is out of bounds for size 0) after evaluating no example."""
    from lorasweep.config import ConfigError

    cfg = tiny_config(max_steps=2, evals=1, max_length=16)
    with pytest.raises(ConfigError, match=r"training.max_length = 16 leaves no training and no eval example"):
        train_run(run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_diverging_run_finishes_with_its_losses_as_measured(tiny_config, tiny_data, tmp_path, caplog):
    """A learning rate far too high: the losses overflow (1e4) or turn NaN (1e8). The run still writes its
    metrics (an infinite perplexity, not an OverflowError after training), its log history keeps the NaN
    losses (not hidden by the Trainer's NaN filter) and a warning says what happened."""
    cfg = tiny_config(max_steps=4, evals=1, logging_steps=1, warmup_ratio=0.0)
    for lr, out in ((1e4, "overflow"), (1e8, "nan")):
        cfg["methods"]["full"]["learning_rate"] = lr
        m = train_run(run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"], tmp_path / out, threads=2)
        assert json.loads((tmp_path / out / "metrics.json").read_text())["run"] == "full"
        history = [json.loads(line) for line in (tmp_path / out / "log_history.jsonl").read_text().splitlines()]
        losses = [h["loss"] for h in history if "loss" in h]
        if out == "overflow":
            assert m["eval_loss"] > 1000 and m["eval_perplexity"] == math.inf
        else:
            assert math.isnan(m["eval_loss"]) and math.isnan(m["eval_perplexity"]) and math.isnan(losses[-1])
            assert "the run has diverged" in caplog.text
    # a diverged LoRA run: its merge is recorded as not checkable instead of failing the workflow's verify step
    from lorasweep.adapters import merge_run, verify_run

    cfg["methods"]["lora"]["learning_rate"] = 1e30
    cfg["training"]["max_steps"] = 6
    spec = run_spec(cfg, "lora-r8")
    m = train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "lora", threads=2)
    assert math.isnan(m["eval_loss"]) and m["train_nonfinite_logs"] >= 1 and m["train_logs"] == 6
    merged = merge_run(spec, tmp_path / "lora" / "model", tmp_path / "merged")
    result = verify_run(spec, tmp_path / "lora" / "model", merged, tiny_data["eval"], tmp_path / "verify.json",
                        n_prompts=2, max_new_tokens=2, trained_losses=tmp_path / "lora" / "eval_losses.json",
                        trained_metrics=tmp_path / "lora" / "metrics.json")  # as the workflow calls it
    assert result["diverged"] and result["within_tolerance"] is None and result["adapter_as_trained"] is None


def test_perplexity_is_exp_of_eval_loss(tiny_config, tiny_data, tmp_path):
    m, _ = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=2)
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))


def test_token_counts_over_one_epoch_equal_the_tokenized_dataset(tiny_config, tiny_data, tiny_model, tmp_path):
    """Non-padding tokens fed in one epoch = every example's prompt + response + EOS tokens, exactly once."""
    from transformers import AutoTokenizer

    from lorasweep.data import read_jsonl

    rows = read_jsonl(tiny_data["train"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    steps_per_epoch = math.ceil(len(rows) / 8)
    m, _ = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=steps_per_epoch, max_length=512)
    lengths = [len(tok(r["prompt"] + r["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"])
               for r in rows]
    prompt_lengths = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert m["train_samples"] == len(rows)
    assert m["train_tokens_nonpad"] == sum(lengths)
    assert m["train_tokens_labelled"] == sum(lengths) - sum(prompt_lengths)
    assert m["train_tokens_padded"] >= m["train_tokens_nonpad"]
    assert m["padding_share_pct"] == pytest.approx(100 * (1 - sum(lengths) / m["train_tokens_padded"]))


def test_length_grouping_reaches_the_batches_training_feeds(tiny_config, tiny_data, tmp_path):
    """training.group_by_length (on by default) is what the Trainer's sampler does: an epoch of grouped batches
    carries a fraction of the padding of random ones, and a training seed other than the split's reorders them
    (a full fine-tuning run has no other source of randomness)."""
    from lorasweep.data import read_jsonl

    epoch = math.ceil(len(read_jsonl(tiny_data["train"])) / 8)
    grouped, _ = _train(tiny_config, tiny_data, tmp_path / "grouped", "full", max_steps=epoch, evals=1)
    shuffled, _ = _train(tiny_config, tiny_data, tmp_path / "random", "full", max_steps=epoch, evals=1,
                         group_by_length=False)
    assert grouped["train_tokens_nonpad"] == shuffled["train_tokens_nonpad"]  # the same examples, once each
    assert grouped["padding_share_pct"] < 0.5 * shuffled["padding_share_pct"]
    spec = run_spec(tiny_config(max_steps=epoch, evals=1), "full", seed=1)  # the split stays seed 0's
    other_seed = train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "seed1", threads=2)
    assert other_seed["train_tokens_nonpad"] == grouped["train_tokens_nonpad"]
    assert other_seed["train_loss"] != grouped["train_loss"]


def test_examples_whose_prompt_fills_max_length_are_counted_out_of_the_epoch_and_the_eval(
        tiny_config, tiny_data, tiny_model, tmp_path, caplog):
    """TRL drops an example whose prompt alone fills max_length (no response token left): an epoch is then
    the examples kept, and the run says how many were left out, instead of training extra epochs."""
    import logging

    from transformers import AutoTokenizer

    from lorasweep.data import read_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = sorted(len(tok(r["prompt"])["input_ids"]) for r in read_jsonl(tiny_data["train"]))
    max_length = prompts[len(prompts) // 2]  # about half the prompts fill it
    with caplog.at_level(logging.WARNING, logger="lorasweep"):
        m, out = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=-1, epochs=1, max_length=max_length,
                        evals=1)
    info = json.loads((out / "metrics.json").read_text())["train_info"]
    n_rows = len(read_jsonl(tiny_data["train"]))
    kept, left_out = info["train_examples"], info["train_examples_dropped_too_long"]
    assert kept + left_out == n_rows and 0 < left_out < n_rows
    assert m["train_samples"] == kept and m["train_steps"] == math.ceil(kept / 8)  # one epoch of what is kept
    n_eval = len(read_jsonl(tiny_data["eval"]))
    assert info["eval_examples"] + info["eval_examples_dropped_too_long"] == n_eval
    assert len(json.loads((out / "eval_losses.json").read_text())["final"]) == info["eval_examples"]
    assert f"their prompt alone fills training.max_length = {max_length}" in caplog.text


def test_examples_holding_a_special_tokens_text_are_counted_and_warned_of(tiny_config, tiny_data, tiny_model, tmp_path,
                                                                        caplog):
    """A response holding "</s>" (an HTML strikethrough's close; OPT's EOS) is tokenized with an EOS inside it, and
    TRL appends none after it: the run says so instead of training that silently."""
    import logging

    from transformers import AutoTokenizer

    from lorasweep.data import read_jsonl, write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = read_jsonl(tiny_data["train"])
    rows[0] = {**rows[0], "completion": "Use <s>old</s>"}
    assert tok(rows[0]["completion"])["input_ids"][-1] == tok.eos_token_id  # the text is read as the token
    train = tmp_path / "data" / "train.jsonl"
    write_jsonl(train, rows)
    eval_path = train.with_name("eval.jsonl")
    eval_path.write_bytes(tiny_data["eval"].read_bytes())
    with caplog.at_level(logging.WARNING, logger="lorasweep"):
        m = train_run(run_spec(tiny_config(max_steps=2, evals=1), "lora-r8"), train, eval_path, tmp_path / "run",
                      threads=2)
    assert (m["train_examples_with_special_token_text"], m["eval_examples_with_special_token_text"]) == (1, 0)
    assert "1 training and 0 eval example(s) hold the text of one of the tokenizer's special tokens" in caplog.text


def test_peak_rss_grows_with_the_batch_size(tiny_config, tiny_data, tmp_path):
    small, _ = _train(tiny_config, tiny_data, tmp_path / "small", "full", max_steps=3, batch_size=2, evals=1)
    large, _ = _train(tiny_config, tiny_data, tmp_path / "large", "full", max_steps=3, batch_size=96, evals=1)
    grow = lambda m: m["peak_rss_bytes"] - m["rss_at_load_bytes"]  # noqa: E731
    assert grow(large) > grow(small) + 10 * 2**20
    assert large["predicted_activations_bytes"] > small["predicted_activations_bytes"]


def test_training_peak_leaves_out_the_evaluations(tiny_config, tiny_data, tmp_path):
    """An evaluation of the whole eval split in one batch needs more memory than training at batch 1: that is
    the evaluation's peak (eval_peak_*), not training's."""
    m, _ = _train(tiny_config, tiny_data, tmp_path, "full", max_steps=4, batch_size=1, max_length=256, evals=4,
                  eval_batch_size=64)
    assert m["eval_batch_size"] == 64  # an operational setting: the config's, not the schema's default
    assert m["eval_peak_rss_bytes"] > m["peak_rss_bytes"] + 10 * 2**20
    assert m["peak_rss_bytes"] >= m["rss_at_load_bytes"]
    assert "evaluations during training excluded" in m["memory_measured"]


def test_the_batch_mean_eval_loss_is_the_trainers_own_figure(tiny_model, tiny_data, tmp_path):
    """eval_loss_batch_mean is kept as the figure the Trainer's own evaluation gives (a mean of per-batch means,
    over the batches as they ran: longest first), beside lorasweep's token-weighted eval_loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
    from trl import SFTConfig

    from lorasweep.data import load_splits
    from lorasweep.trainer import MeasuredSFTTrainer

    train, evals = load_splits(tiny_data["train"], tiny_data["eval"])
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=128,
                     per_device_eval_batch_size=4, save_strategy="no", activation_checkpointing=False)
    trainer = MeasuredSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                 args=args, train_dataset=train, eval_dataset=evals,
                                 processing_class=AutoTokenizer.from_pretrained(tiny_model))
    ours = trainer.evaluate()
    theirs = Trainer.evaluate(trainer)
    assert ours["eval_loss_batch_mean"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
    assert ours["eval_loss"] != pytest.approx(theirs["eval_loss"], rel=1e-4)  # token-weighted: not the same


def test_every_evaluation_computes_in_the_training_precision(tiny_model, tiny_data, tmp_path):
    """accelerate puts autocast around the model's forward only once training starts; the untrained model's
    evaluation must be scored in the same precision as the later ones, or base-vs-final differences carry a
    precision change. Here one training step at learning rate 0 leaves the weights as they were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from lorasweep.data import load_splits
    from lorasweep.scoring import per_example_losses
    from lorasweep.trainer import MeasuredSFTTrainer

    train, evals = load_splits(tiny_data["train"], tiny_data["eval"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=0.0, use_cpu=True, bf16=True,
                     report_to="none", per_device_train_batch_size=2, max_length=128, save_strategy="no",
                     activation_checkpointing=False)
    trainer = MeasuredSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                                 processing_class=AutoTokenizer.from_pretrained(tiny_model))
    before = per_example_losses(trainer)
    trainer.train()
    after = per_example_losses(trainer)
    assert [e["loss_sum"] for e in after] == [e["loss_sum"] for e in before]
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trainer.model = fp32
    trainer.args.bf16 = False
    in_fp32 = per_example_losses(trainer)
    assert max(abs(a["loss_sum"] - b["loss_sum"]) for a, b in zip(in_fp32, before)) > 1e-4  # bf16 really used


def test_memory_model_components(tiny_config, tiny_data, tmp_path):
    full, _ = _train(tiny_config, tiny_data, tmp_path, "full", max_steps=2)
    lora, _ = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=2)
    qlora, _ = _train(tiny_config, tiny_data, tmp_path, "qlora-r8", max_steps=2)
    for m in (full, lora, qlora):
        assert m["predicted_optimizer_bytes"] == 8 * m["trainable_params"]
        assert m["predicted_gradients_bytes"] == 4 * m["trainable_params"]
        # the larger of activations and gradients: they peak at the two ends of a backward pass
        assert m["predicted_peak_bytes"] == (m["predicted_weights_bytes"] + m["predicted_optimizer_bytes"]
                                             + max(m["predicted_gradients_bytes"], m["predicted_activations_bytes"]))
        assert m["predicted_peak_bytes"] == sum(m[f"predicted_{k}_bytes"] for k in  # what the figure stacks
                                                ("weights", "optimizer", "activations", "gradients_beyond_activations"))
        assert m["memory_model_compared_to"] == "peak_rss_bytes - rss_at_load_bytes"
        assert math.isfinite(m["memory_model_error_pct"])
    assert full["predicted_weights_bytes"] == 4 * full["total_params"]
    assert qlora["predicted_weights_bytes"] < lora["predicted_weights_bytes"]  # 4-bit base weights


def test_memory_model_peak_holds_the_gradients_when_they_outweigh_the_activations(tiny_model):
    """One short sequence keeps less than full fine-tuning's gradients: the peak is then at the end of the backward
    pass, weights + AdamW state + gradients, with the gradients beyond the activations shown apart."""
    from transformers import AutoModelForCausalLM

    from lorasweep.memory_model import predict

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    n = sum(p.numel() for p in model.parameters())
    small, large = predict(model, n, 1, 8, "fp32"), predict(model, n, 64, 128, "fp32")
    assert small["predicted_activations_bytes"] < 4 * n < large["predicted_activations_bytes"]
    assert small["predicted_peak_bytes"] == small["predicted_weights_bytes"] + 12 * n
    assert small["predicted_gradients_beyond_activations_bytes"] == 4 * n - small["predicted_activations_bytes"]
    assert large["predicted_gradients_beyond_activations_bytes"] == 0
    # with gradient accumulation the first micro-batches' gradients wait beside the next one's activations
    accum = predict(model, n, 64, 128, "fp32", grad_accum=2)
    assert accum["predicted_peak_bytes"] == (large["predicted_weights_bytes"] + 12 * n
                                             + large["predicted_activations_bytes"])


def test_tokenization_runs_once_per_sweep_and_is_reused(tiny_config, tiny_data, tmp_path, caplog):
    """The first run tokenizes into results/data/cache; the next run (same tokenizer, max_length) only loads it.
    Each says so before it starts (a large dataset's tokenization took minutes without a word: 94 s for 200k records
    on a 2-core CPU)."""
    import logging
    import shutil

    from lorasweep.data import read_jsonl

    data = tmp_path / "data"
    data.mkdir()
    for k in ("train", "eval"):
        shutil.copy(tiny_data[k], data / f"{k}.jsonl")

    def cache_files():
        return sorted(p.name for p in (data / "cache").rglob("cache-*.arrow"))

    cfg = tiny_config(max_steps=2)
    with caplog.at_level(logging.INFO, logger="lorasweep"):
        first = train_run(run_spec(cfg, "full"), data / "train.jsonl", data / "eval.jsonl", tmp_path / "full")
    lines = [r.getMessage() for r in caplog.records]
    n_train, n_eval = (len(read_jsonl(data / f"{k}.jsonl")) for k in ("train", "eval"))
    said = lines.index(f"preparing {n_train} train and {n_eval} eval examples (tokenized by the sweep's first "
                       "training job, then read from its cache)")
    assert said < next(i for i, line in enumerate(lines) if line.startswith("datasets ready in"))
    written = cache_files()
    assert len(written) >= 4  # EOS, tokenize, labels, truncate ... for train and eval
    second = train_run(run_spec(cfg, "lora-r8"), data / "train.jsonl", data / "eval.jsonl", tmp_path / "lora")
    assert cache_files() == written  # nothing recomputed
    assert second["train_tokens_nonpad"] == first["train_tokens_nonpad"]
    assert first["train_info"]["data_tokenized"] and not second["train_info"]["data_tokenized"]
    # a different max_length is a different preparation: computed once more
    third = train_run(run_spec(tiny_config(max_steps=2, max_length=64), "full"), data / "train.jsonl",
                      data / "eval.jsonl", tmp_path / "short")
    assert set(cache_files()) > set(written) and third["train_info"]["data_tokenized"]


def test_per_example_eval_losses_line_up_across_runs(tiny_config, tiny_data, tiny_model, tmp_path):
    """Example i is the same eval example in every run (eval-split order), so paired differences pair like with
    like: the untrained full model and the untrained LoRA model (B = 0) score every example identically."""
    from transformers import AutoTokenizer

    from lorasweep.data import read_jsonl

    _train(tiny_config, tiny_data, tmp_path, "full", max_steps=1)
    _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=1)
    full, lora = (json.loads((tmp_path / r / "eval_losses.json").read_text())["base"] for r in ("full", "lora-r8"))
    assert [e["tokens"] for e in full] == [e["tokens"] for e in lora]
    assert [e["loss_sum"] for e in full] == pytest.approx([e["loss_sum"] for e in lora], rel=1e-5)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = read_jsonl(tiny_data["eval"])
    lengths = [len(tok(r["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]) for r in rows]
    assert sum(abs(e["tokens"] - n) <= 1 for e, n in zip(full, lengths)) == len(rows)  # split order, not grouped


def test_a_run_records_the_training_jobs_that_shared_its_gpu(tiny_config, tiny_data, tmp_path):
    """gpu_peers is GpuSlot.peers in the workflow: asked when training starts, every 10 s and at the end; the
    most seen is recorded. Without it (no slot claimed) the metric is None, not 0."""
    seen = iter([2, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    spec = run_spec(tiny_config(max_steps=3, evals=1), "lora-r8")
    m = train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "shared", threads=2,
                  gpu_peers=lambda: next(seen))
    assert m["gpu_jobs_beside_max"] == 2
    alone, _ = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=2, evals=1)
    assert alone["gpu_jobs_beside_max"] is None


def test_memory_model_keeps_attention_matrices_only_for_eager_attention(tiny_model):
    """SDPA's fused kernels keep no s x s matrices for the backward pass, eager attention keeps them: measured
    on the real model (bytes autograd saves), and the prediction, scaled from three short probe batches to a
    longer batch, is what autograd saves for that batch."""
    from transformers import AutoModelForCausalLM

    from lorasweep.memory_model import predict, saved_bytes

    models = {impl: AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl).train()
              for impl in ("sdpa", "eager")}
    cfg = models["sdpa"].config
    b, s = 4, 200
    measured = {k: saved_bytes(m, b, s, None, fused_loss=False) for k, m in models.items()}
    probs = cfg.num_hidden_layers * cfg.num_attention_heads * s * s * b * 4  # fp32 attention probabilities
    # eager keeps the fp32 probabilities (SDPA keeps a per-row log-sum-exp instead: a little under them)
    assert measured["eager"] - measured["sdpa"] == pytest.approx(probs, rel=0.02)
    pred = {k: predict(m, 0, b, s, "fp32")["predicted_activations_bytes"] for k, m in models.items()}
    for k in models:
        assert pred[k] == pytest.approx(measured[k], rel=1e-3), k


def _probe_models(tiny_model) -> dict:
    """The tiny model as SFTTrainer trains it (TRL's fused LM head), for full fine-tuning, LoRA r8 with dropout
    and DoRA on q/k/v."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from lorasweep.train import lora_config

    def fused():
        m = AutoModelForCausalLM.from_pretrained(tiny_model)
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
        return m.train()

    def lora(**extra):
        return get_peft_model(fused(), lora_config({"lora": {"r": 8, "alpha": 32, "dropout": 0.1, **extra}},
                                                   ["q_proj", "k_proj", "v_proj"]))

    return {"full": fused(), "lora-r8": lora(), "lora-r8-dora": lora(use_dora=True)}


def test_memory_model_follows_method_dropout_and_autocast(tiny_model):
    """The probe counts what the training model keeps, whatever the method: full fine-tuning and LoRA with
    dropout (frozen layers keep no inputs for weight gradients, dropout keeps its noise), in fp32 and under bf16
    autocast (which also keeps 16-bit copies of the trainable weights, once per step whatever the batch): the
    prediction for a longer batch is what autograd saves for it, through TRL's fused LM head."""
    from lorasweep.memory_model import activation_bytes, saved_bytes

    # DoRA builds and drops a graph for its weight norm in every forward: what that graph saved is freed with it
    # and must not count (counted, the prediction was 2.5% / 6.2% high here, 51-82% for opt-350m's shape)
    models = _probe_models(tiny_model)
    b, s = 6, 300
    for name, model in models.items():
        for half in (None, torch.bfloat16):
            real = saved_bytes(model, b, s, half, fused_loss=True)  # the longer batch itself, counted directly
            assert activation_bytes(model, b, s, half, True) == pytest.approx(real, rel=1e-3), (name, half)


def test_saved_bytes_are_what_the_loss_graph_holds(tiny_model):
    """An independent count of the probe's: the tensors reachable from the loss's autograd graph (each node's
    ``_saved_*``). They differ by the same bytes (to a few scalars) for full fine-tuning, LoRA and DoRA: what TRL's
    fused loss keeps on its own autograd Function's context, which the walk cannot see. Counting a graph the
    forward dropped (DoRA's weight norm) would make DoRA's difference larger."""
    from lorasweep.memory_model import saved_bytes

    def graph_held(model, half):
        ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 64),
                            generator=torch.Generator().manual_seed(0))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.enable_grad(), torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
        seen, stack, held = set(), [out.loss.grad_fn], {}
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for name in dir(node):
                if name.startswith("_saved_"):
                    try:
                        value = getattr(node, name)
                    except RuntimeError:  # a saved value already freed
                        continue
                    for t in value if isinstance(value, (tuple, list)) else [value]:
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            stack.extend(f for f, _ in node.next_functions)
        return sum(held.values())

    models = _probe_models(tiny_model)
    for half in (None, torch.bfloat16):
        beyond = {k: saved_bytes(m, 2, 64, half, fused_loss=True) - graph_held(m, half) for k, m in models.items()}
        # equal to a few scalars (48 bytes seen, either way); counting DoRA's dropped weight-norm graph added 22-72 KB
        assert max(beyond.values()) - min(beyond.values()) <= 1024 and min(beyond.values()) >= 0, (half, beyond)


def test_memory_model_chunked_loss_working_memory_is_measured(tmp_path):
    """TRL's chunked loss over a 50,272-row LM head on the CPU: the predicted working memory matches the peak RSS
    of a forward and backward pass whose activations are negligible (one narrow layer), measured with large
    tensors given back to the system as they are freed."""
    script = tmp_path / "loss_peak.py"
    script.write_text("""\
import json, torch
from pathlib import Path
from lorasweep.tiny import random_opt
from lorasweep.memory_model import chunked_loss_work_bytes
from trl.trainer.utils import add_fused_lm_head

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

m = random_opt(50272, num_layers=1, hidden_size=64, ffn_dim=128, num_heads=2)
add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
ids = torch.randint(0, 50272, (8, 512))
labels = ids.clone()
labels[:, :200] = -100

def step():
    m(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()

step()
m.zero_grad(set_to_none=True)
Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
step()
print(json.dumps({"peak": status("VmHWM") - base, "pred": chunked_loss_work_bytes(m, 8, 512, "fp32"),
                  "grads": sum(p.numel() * 4 for p in m.parameters())}))
""")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["pred"] > 3 * 2**30  # 8.25 fp32 tiles of 4,088 positions x 32,768 columns, and more
    assert r["pred"] == pytest.approx(r["peak"] - r["grads"], rel=0.1)


def test_a_failed_memory_prediction_costs_the_run_nothing(tiny_config, tiny_data, tmp_path, monkeypatch):
    """A model whose probe batches fail (as those of a model shorter than the probes did, in its position embedding,
    before the probes fit the model's positions) still trains and writes its metrics, without a prediction."""
    from lorasweep import memory_model

    def probe_fails(*args, **kwargs):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(memory_model, "saved_bytes", probe_fails)
    spec = run_spec(tiny_config(max_steps=2, evals=1), "full")
    m = train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_loss"] == m["eval_loss"]
    assert m["memory_model_error_pct"] is None and "predicted_peak_bytes" not in m
    assert m["peak_rss_bytes"] > 0


def test_evaluation_time_is_left_out_of_the_training_time(tiny_config, tiny_data, tmp_path, monkeypatch):
    """Evaluations during training (here slowed by 0.3 s each, as a larger model's would take seconds) are timed
    apart: eval_time_during_train_s is their logged runtime, and training time is the wall minus it. The
    untrained model's evaluation comes before training's clock starts."""
    import time

    from lorasweep import scoring

    real, pause = scoring.per_example_losses, 0.3

    def slowed(trainer):
        time.sleep(pause)
        return real(trainer)

    monkeypatch.setattr(scoring, "per_example_losses", slowed)
    m, out = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=4, evals=4, logging_steps=1)
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    during = [h["eval_runtime"] for h in history if "eval_runtime" in h and h["step"] > 0]
    assert len(during) == 4 and all(r >= pause for r in during)
    assert m["eval_time_during_train_s"] == pytest.approx(sum(during))
    assert m["checkpoint_time_s"] == 0
    assert m["train_wall_s"] - m["train_runtime_s"] == pytest.approx(sum(during), abs=0.02)
    assert 0 < m["train_runtime_s"] < m["train_wall_s"] - 4 * pause


def test_gradient_accumulation_learns_what_the_whole_batch_learns(tiny_config, tiny_data, tmp_path):
    """What an out-of-memory retry trains: batch 8 as 4 x accumulation 2 is the same optimisation (the loss
    normalised by the tokens of the whole effective batch, not per micro-batch), to rounding."""
    whole, out_whole = _train(tiny_config, tiny_data, tmp_path / "whole", "full", max_steps=6, evals=1,
                              logging_steps=1)
    split, out_split = _train(tiny_config, tiny_data, tmp_path / "split", "full", max_steps=6, evals=1,
                              logging_steps=1, batch_size=4, grad_accum=2)
    assert (split["train_samples"], split["train_tokens_labelled"]) == (whole["train_samples"],
                                                                        whole["train_tokens_labelled"])
    logged = [[h["loss"] for h in map(json.loads, (o / "log_history.jsonl").read_text().splitlines()) if "loss" in h]
              for o in (out_whole, out_split)]
    assert len(logged[0]) == 6 and logged[1] == pytest.approx(logged[0], rel=1e-4, abs=1e-4)
    assert split["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-4)


def test_training_jobs_that_start_together_tokenize_the_splits_once(tiny_model, tiny_data, tmp_path):
    """Two training jobs of one sweep starting at the same moment (several jobs on one GPU, or one per GPU): one
    tokenizes the splits, the other loads its result from datasets' cache (issue 7: tokenization once per sweep;
    on an H200 five jobs started together had each spent 9-15 s preparing the same 19k examples)."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()  # fresh splits: the session's tiny_data cache was filled by other tests
    for k in ("train", "eval"):
        shutil.copy(tiny_data[k], data / f"{k}.jsonl")
    cfg = {"model": {"name_or_path": str(tiny_model)}, "dataset": {"source": str(tiny_data["source"])},
           "methods": {"lora": {"ranks": [8]}},
           "training": {"device": "cpu", "max_steps": 2, "batch_size": 4, "max_length": 128, "evals": 1}, "seed": 0}
    job = ("import json, sys\nfrom lorasweep.config import run_spec, validate_config\n"
           "from lorasweep.train import train_run\n"
           "spec = run_spec(validate_config(json.loads(sys.argv[1])), sys.argv[2])\n"
           "train_run(spec, sys.argv[3], sys.argv[4], sys.argv[5], threads=1)\n")
    runs = ("full", "lora-r8")
    procs = [subprocess.Popen([sys.executable, "-c", job, json.dumps(cfg), run, data / "train.jsonl",
                               data / "eval.jsonl", tmp_path / run], stderr=subprocess.PIPE, text=True)
             for run in runs]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    info = {run: json.loads((tmp_path / run / "metrics.json").read_text())["train_info"] for run in runs}
    assert sorted(i["data_tokenized"] for i in info.values()) == [False, True], info


def test_examples_longer_than_max_length_are_counted_cut_or_left_out(tiny_config, tiny_data, tmp_path):
    """TRL keeps the start of an example longer than max_length (its response cut: trained and scored without its
    end) and leaves out one whose prompt alone fills it; the metrics count both, as the tokenizer says."""
    from transformers import AutoTokenizer

    from lorasweep.config import operational
    from lorasweep.data import read_jsonl

    cfg = tiny_config(max_length=64, max_steps=2, evals=1)
    m = train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2,
                  operational=operational(cfg))
    tok = AutoTokenizer.from_pretrained(cfg["model"]["name_or_path"])
    for split in ("train", "eval"):
        rows = read_jsonl(tiny_data[split])
        full = [len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]  # + EOS
        prompt = [len(tok(r["prompt"])["input_ids"]) for r in rows]
        cut = sum(1 for f, p in zip(full, prompt) if f > 64 and p < 64)
        left_out = sum(1 for p in prompt if p >= 64)
        assert cut > 0 and left_out > 0
        assert (m[f"{split}_examples_cut_at_max_length"], m[f"{split}_examples_dropped_too_long"]) == (cut, left_out)


def test_a_runs_mfu_step_bound_and_throughput_follow_its_own_counts(tiny_config, tiny_data, tmp_path, monkeypatch):
    """M03, M04, M05, T06: the run's own metrics.json figures, with only the GPU's name stood in."""
    import lorasweep.train as train
    from lorasweep import speed

    h100 = "NVIDIA H100 80GB HBM3"
    real = train.hardware
    monkeypatch.setattr(train, "hardware", lambda device: {**real(device), "gpu_name": h100})
    spec = run_spec(tiny_config(max_steps=4, evals=1, precision="bf16", batch_size=4, grad_accum=2), "lora-r8")
    m = train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path, threads=2)
    tps = m["train_tokens_nonpad"] / m["train_runtime_s"]
    assert m["train_tokens_nonpad_per_s"] == pytest.approx(tps)
    shape = speed.flop_shape(m, m["train_tokens_labelled"] / m["train_tokens_nonpad"])
    assert 0 < shape["labelled_share"] < 1
    assert m["mfu_pct"] == pytest.approx(
        100 * speed.flops_per_token(m["total_params"], m["trainable_params"], **shape) * tps / 989e12)
    traffic = speed.bytes_per_step(m["trainable_params"], m["total_params"] - m["trainable_params"], 0, True,
                                   micro_batches=2, frozen_16bit=m["frozen_16bit_params"])
    assert m["step_floor_memory_ms"] == pytest.approx(1e3 * traffic / 3.35e12)


def test_rss_before_load_is_read_before_the_model_is_loaded(tiny_config, tiny_data, tmp_path, monkeypatch):
    """T05: the CPU memory findings subtract rss_before_load_bytes; read after loading it would drop the weights."""
    import lorasweep.train as train

    events, real_load, real_rss = [], train.load_model, train.rss_bytes
    monkeypatch.setattr(train, "load_model", lambda *a, **k: (events.append("load"), real_load(*a, **k))[1])
    monkeypatch.setattr(train, "rss_bytes", lambda: (events.append("rss"), real_rss())[1])
    m = train_run(run_spec(tiny_config(max_steps=1, evals=1), "full"), tiny_data["train"], tiny_data["eval"],
                  tmp_path, threads=2)
    assert events == ["rss", "load"] and m["rss_before_load_bytes"] > 0


def test_memory_model_predicts_for_a_model_with_fewer_positions_than_its_longest_probe(tiny_data, tmp_path):
    """model.build_tiny.max_positions (and training.max_length) may be as low as 16: the probe batches of 32, 64 and
    128 tokens ran past such a model's positions (OPT's embedding lookup: IndexError), and every run of the sweep went
    without a memory prediction, the report's memory table and figure without one. The probes fit in its positions
    and still predict what autograd keeps for a batch of its longest sequences."""
    from transformers import AutoModelForCausalLM

    from lorasweep.data import read_jsonl
    from lorasweep.memory_model import predict, saved_bytes
    from lorasweep.tiny import build_tiny_model

    texts = [r["prompt"] + r["completion"] for r in read_jsonl(tiny_data["train"])]
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(texts, tmp_path / "opt-64", max_positions=64))
    n = sum(p.numel() for p in model.parameters())
    got = predict(model, n, 4, 64, "fp32", fused_loss=True)
    real = saved_bytes(model, 4, 64, None, fused_loss=True)
    assert got["predicted_saved_for_backward_bytes"] == pytest.approx(real, rel=1e-3)


def test_the_console_names_the_job_gives_an_eta_and_what_writes_below_python_goes_to_the_log(tiny_config, tiny_data,
                                                                                              tmp_path, capfd):
    """Several jobs print to one console at once (training runs with gpu=N, the adapter stages): each line names its
    job, and a training step says how long the run has left. What writes to the job's stderr below Python (papermill's
    kernel, a library's C++ warning) goes to the job's log, not the console."""
    import re

    from lorasweep.logs import script_logging

    log_path = tmp_path / "logs" / "train" / "full" / "seed0.log"
    capfd.readouterr()
    with script_logging(log_path):
        _train(tiny_config, tiny_data, tmp_path, "full", max_steps=20, logging_steps=5)
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('a subprocess warning\\n')"], check=True)
    console = capfd.readouterr().err
    steps = [line for line in console.splitlines() if re.search(r"step \d+/20 ", line)]
    assert len(steps) >= 4 and all("[train/full/seed0] lorasweep.train: step" in line for line in steps), console
    assert re.search(r"step 5/20 .*loss [\d.]+ .* eta \d+s$", console, re.M), console
    assert not re.search(r"step 20/20 .*eta", console) and "step 0/0" not in console  # none at the end, none before
    assert "a subprocess warning" not in console and "a subprocess warning" in log_path.read_text()


def test_saved_weights_are_as_readable_as_the_files_beside_them(tiny_config, tiny_data, tmp_path):
    """Under umask 022 the tiny model's, a trained adapter's and a merged model's *.safetensors were 0600 while their
    config and tokenizer were 0644 (safetensors 0.8 writes through a 0600 temporary file): another user of a
    project folder shared with a group could read everything but the weights. They now get the umask's mode too."""
    import stat

    from lorasweep.adapters import merge_run
    from lorasweep.tiny import build_tiny_model_from_jsonl

    old = os.umask(0o022)
    try:
        build_tiny_model_from_jsonl(tiny_data["train"], tmp_path / "tiny")
        _, out = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=2, evals=1)
        merge_run(run_spec(tiny_config(), "lora-r8"), out / "model", tmp_path / "merged")
    finally:
        os.umask(old)
    for folder in (tmp_path / "tiny", out / "model", tmp_path / "merged"):
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir() if p.is_file()}
        assert any(name.endswith(".safetensors") for name in modes)
        assert set(modes.values()) == {"0o644"}, (folder.name, modes)
