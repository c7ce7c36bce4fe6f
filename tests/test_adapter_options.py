"""Adapter options (init, rsLoRA, DoRA) and target-module presets, on real models and real training steps."""

import json
import warnings

import pytest
import torch

from lorasweep.config import ConfigError, run_names, run_spec, validate_config


def _config(tiny_config, ranks, **training):
    cfg = tiny_config(**training)
    cfg["methods"]["lora"]["ranks"] = ranks
    return validate_config(cfg)


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_olora_and_pissa_move_base_weight_into_the_adapter_and_still_merge_exactly(init, tiny_config, tiny_data,
                                                                                   tiny_model, tmp_path, monkeypatch):
    """PEFT documents OLoRA as W = W_res + s B0 A0 with B0 orthonormal (QR of W), PiSSA likewise from the top-r
    singular vectors: the base weight changes. The saved adapter must still fit the *original* base, and the
    merged model must compute what the trained (residual base + adapter) model computed."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasweep.adapters import _batch, merge_run, score, verify_run
    from lorasweep.data import read_jsonl
    from lorasweep import train as T
    from lorasweep.train import attach_lora, load_model, train_run

    cfg = _config(tiny_config, [{"rank": 8, "init": init}], max_steps=6)
    spec = run_spec(cfg, f"lora-r8-{init}")
    assert spec["lora"]["init"] == init

    original = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model = attach_lora(load_model(spec, "cpu", "fp32"), spec).eval()
    layer = model.base_model.model.model.decoder.layers[0].self_attn.q_proj
    w0 = original.model.decoder.layers[0].self_attn.q_proj.weight
    w_res, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert (w_res - w0).abs().max() > 1e-2  # the base weight really changed ...
    torch.testing.assert_close(w_res + layer.scaling["default"] * b @ a, w0, atol=1e-5, rtol=0)  # ... by s B0 A0
    if init == "olora":
        torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=0)  # B0: orthonormal columns (Q of the QR)
    else:  # PiSSA: B0 A0 is the best rank-8 approximation of W, so the residual holds the smaller singular values
        s_w, s_res = torch.linalg.svdvals(w0), torch.linalg.svdvals(w_res.detach())
        torch.testing.assert_close(s_res[: len(s_w) - 8], s_w[8:], atol=1e-4, rtol=0)
    batch = _batch(AutoTokenizer.from_pretrained(tiny_model), read_jsonl(tiny_data["eval"])[:4])
    torch.testing.assert_close(score(model, batch)["logits"], score(original, batch)["logits"], atol=1e-4, rtol=0)

    out = tmp_path / "run"
    trained_adapter = {}  # as it trained, before saving converts it
    save_trained = T.save_trained

    def keep_trained_adapter(trainer, *args):
        trained_adapter.update({k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()})
        save_trained(trainer, *args)

    monkeypatch.setattr(T, "save_trained", keep_trained_adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = train_run(spec, tiny_data["train"], tiny_data["eval"], out)
    assert m["lora_init"] == init and m["eval_loss"] < m["base_eval_loss"]
    # the conversion's own loading of the initial adapter is no warning of the user's: it left one in every log
    assert not [str(w.message) for w in caught if "changes the base weights" in str(w.message)]
    saved = json.loads((out / "model" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["init_lora_weights"] is True  # converted: Delta W = A B - A0 B0, rank 2r

    # the trained model as it trained: residual base + the unconverted adapter
    trained = attach_lora(load_model(spec, "cpu", "fp32"), spec)
    set_peft_model_state_dict(trained, trained_adapter)
    merged_dir = merge_run(spec, out / "model", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    diff = (score(trained.eval(), batch)["logits"] - score(merged, batch)["logits"]).abs().max()
    assert diff < 1e-4
    result = verify_run(spec, out / "model", merged_dir, tiny_data["eval"], tmp_path / "verify.json", n_prompts=4,
                        max_new_tokens=4, trained_losses=out / "eval_losses.json", trained_metrics=out / "metrics.json")
    assert result["within_tolerance"] and result["greedy_identical"] and result["adapter_as_trained"]


def test_rslora_and_dora_reach_peft(tiny_config, tiny_model):
    from lorasweep.train import attach_lora, count_parameters, load_model

    cfg = _config(tiny_config, [8, {"rank": 8, "use_rslora": True, "use_dora": True}])
    assert run_names(cfg) == ["full", "lora-r8", "lora-r8-rslora-dora", "qlora-r8"]
    plain = attach_lora(load_model(run_spec(cfg, "lora-r8"), "cpu", "fp32"), run_spec(cfg, "lora-r8"))
    spec = run_spec(cfg, "lora-r8-rslora-dora")
    model = attach_lora(load_model(spec, "cpu", "fp32"), spec)
    layer = model.base_model.model.model.decoder.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(spec["lora"]["alpha"] / 8**0.5)  # alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector  # DoRA's learned magnitude
    extra = count_parameters(model)["trainable_params"] - count_parameters(plain)["trainable_params"]
    base = load_model(spec, "cpu", "fp32")
    assert extra == sum(m.out_features for n, m in base.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")))


def test_option_combinations_peft_cannot_undo_are_refused(tiny_config):
    with pytest.raises(ConfigError, match=r"methods.lora.ranks\[0\]: init 'pissa' \(methods.lora.ranks\[0\].init\) "
                                         r"cannot be combined with use_dora \(methods.lora.ranks\[0\].use_dora\)"):
        _config(tiny_config, [{"rank": 8, "init": "pissa", "use_dora": True}])
    with pytest.raises(ConfigError, match=r"run 'lora-r8' is listed twice"):
        _config(tiny_config, [8, {"rank": 8, "init": "default"}])
    cfg = tiny_config()
    cfg["methods"]["qlora"]["ranks"] = [{"rank": 8, "init": "olora"}]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) methods.qlora.ranks\[0\].init; allowed here: rank, "
                                         r"use_dora, use_rslora \(QLoRA runs use the default init"):
        validate_config(cfg)


@pytest.mark.parametrize("init, targets", [("olora", "attention"), ("pissa", "all-linear")])
def test_an_olora_or_pissa_rank_beyond_the_target_weights_stops_before_training(init, targets, tiny_config,
                                                                                tiny_data, tmp_path):
    """OLoRA / PiSSA take r directions of each target weight (QR, SVD): a [64, 64] weight has 64. config.yaml's
    own example, {rank: 128, init: olora} on the tiny model, trained the whole run and then failed converting the
    saved adapter (a state_dict size mismatch). It stops before the data, naming the key and the largest rank;
    that rank trains and saves, and PEFT's default init keeps taking any rank."""
    from lorasweep.train import train_run

    cfg = _config(tiny_config, [{"rank": 128, "init": init}, {"rank": 64, "init": init}, 128], max_steps=1, evals=1)
    cfg["methods"]["lora"]["target_modules"] = targets
    with pytest.raises(ConfigError, match=rf"methods.lora.ranks: run lora-r128-{init} asks for rank 128 with init "
                                          rf"{init} .*self_attn.k_proj \(weight \[64, 64\]\) has 64: the largest "
                                          r"rank the target weights of model.name_or_path = .* allow is 64"):
        train_run(run_spec(cfg, f"lora-r128-{init}"), tiny_data["train"], tiny_data["eval"], tmp_path / "r128",
                   threads=2)
    assert not (tmp_path / "r128" / "log_history.jsonl").exists()
    from lorasweep.train import check_model_settings

    check_model_settings(run_spec(cfg, "lora-r128"))  # default init: any rank
    if init == "olora":  # the largest rank trains and saves (converted to a plain rank-128 adapter)
        train_run(run_spec(cfg, "lora-r64-olora"), tiny_data["train"], tiny_data["eval"], tmp_path / "r64", threads=2)
        assert (tmp_path / "r64" / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("targets, error", [
    (["q_proj", "lm_head"], r"'lm_head' is the model's output layer, which TRL's SFTTrainer does not adapt"),
    (["q_prj"], r"\['q_prj'\] not found in OPTForCausalLM; its linear modules are \['fc1', 'fc2', 'k_proj', "
                r"'out_proj', 'q_proj', 'v_proj'\]"),
])
def test_target_modules_the_model_cannot_take_stop_before_the_data(targets, error, tiny_config, tmp_path):
    """A misspelt module or the output layer: the job stops naming the key before it reads the data (here splits that
    cannot be read: before, the error was theirs; with readable data, PEFT's or TRL's after the data and the model
    had loaded)."""
    from lorasweep.train import train_run

    cfg = _config(tiny_config, [8], max_steps=1, evals=1)
    cfg["methods"]["lora"]["target_modules"] = targets
    for split in ("train", "eval"):  # splits that fail as soon as they are read
        (tmp_path / f"{split}.jsonl").write_text("not JSON\n")
    with pytest.raises(ConfigError, match=rf"methods.lora.target_modules: .*{error}"):
        train_run(run_spec(cfg, "lora-r8"), tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "run",
                  threads=2)


def test_a_model_without_a_meta_device_skeleton_still_trains_lora(tiny_config, tiny_data, tmp_path, monkeypatch):
    """The early target_modules check builds the model on the meta device; an architecture that cannot be built there
    must not stop a LoRA run that trains fine (PEFT's default init needs no shapes): its modules are checked once the
    model has loaded, as before the early check."""
    from lorasweep import presets
    from lorasweep.train import train_run

    def no_skeleton(*args, **kwargs):
        raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    monkeypatch.setattr(presets, "meta_skeleton", no_skeleton)
    cfg = _config(tiny_config, [8], max_steps=1, evals=1)
    m = train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2)
    assert m["train_steps"] == 1 and m["target_modules"] == "k_proj,q_proj,v_proj"


def _tiny(arch: str):
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    configs = {
        "gpt2": GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32),
        "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64),
        "gpt_neox": GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  vocab_size=64),
    }
    return AutoModelForCausalLM.from_config(configs[arch])


@pytest.mark.parametrize("arch, expected", [("gpt2", ["c_attn"]), ("llama", ["q_proj", "k_proj", "v_proj"]),
                                            ("gpt_neox", ["query_key_value"])])
def test_attention_preset_per_architecture_attaches_with_peft(arch, expected):
    from peft import LoraConfig, get_peft_model

    from lorasweep.presets import resolve_target_modules

    model = _tiny(arch)
    targets = resolve_target_modules(model, "attention")
    assert targets == expected
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == set(expected)


def test_an_architecture_without_a_preset_takes_its_q_k_v_projections_or_stops(caplog):
    """'attention' on a model type without a preset fell back to all-linear (a StableLM adapted every linear
    layer: 3.4x the parameters of its attention's). It takes q_proj, k_proj and v_proj, the presets' attention
    for OPT and Llama-style models, where the model has them, and otherwise stops naming its linear layers."""
    import logging

    from peft import LoraConfig, get_peft_model
    from transformers import StableLmConfig, StableLmForCausalLM

    from lorasweep.presets import ATTENTION, resolve_target_modules

    stablelm = StableLmForCausalLM(StableLmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    assert stablelm.config.model_type not in ATTENTION
    with caplog.at_level(logging.INFO, logger="lorasweep"):
        targets = resolve_target_modules(stablelm, "attention")
    assert targets == ["q_proj", "k_proj", "v_proj"]
    assert "no attention preset for model type 'stablelm': adapting its q_proj, k_proj, v_proj" in caplog.text
    peft_model = get_peft_model(stablelm, LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 2 * 3 * 8 * (64 + 64)  # 6,144

    model = _tiny("gpt2")
    model.config.model_type = "my-new-arch"  # no preset, no q/k/v_proj
    assert "my-new-arch" not in ATTENTION
    with pytest.raises(ConfigError, match=r"methods.lora.target_modules: 'attention' has no preset for model type "
                                          r"'my-new-arch' \(GPT2LMHeadModel\), and the model has no q_proj, k_proj, "
                                          r"v_proj .*its linear modules are \['c_attn', 'c_fc', 'c_proj'\]"):
        resolve_target_modules(model, "attention")


@pytest.mark.parametrize("targets, shown", [
    ("all-linear", "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"),  # PEFT: 14 full module paths
    (["q_proj", "k_proj", "v_proj"], "k_proj,q_proj,v_proj"),
    (["self_attn.q_proj", "mlp.up_proj"], "mlp.up_proj,self_attn.q_proj"),  # as configured
    (["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),  # one layer's: not every q_proj
])
def test_the_adapted_modules_are_shown_by_name_not_one_path_per_layer(targets, shown):
    from peft import LoraConfig, get_peft_model

    from lorasweep.train import adapted_modules

    model = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
    assert adapted_modules(model) == shown


def test_a_module_list_is_checked_against_the_model():
    from lorasweep.presets import resolve_target_modules

    model = _tiny("gpt2")
    with pytest.raises(ConfigError, match=r"\['q_proj'\] not found in GPT2LMHeadModel; its linear modules are "
                                          r"\['c_attn', 'c_fc', 'c_proj'\]"):
        resolve_target_modules(model, ["q_proj"])
    # the output layer is no choice: TRL computes the loss from its weight and refuses an adapter there (after the
    # data were loaded); it is refused first, and not offered
    for targets in (["c_attn", "lm_head"], ["transformer.lm_head"]):
        with pytest.raises(ConfigError, match=r"'lm_head' is the model's output layer, which TRL's SFTTrainer does "
                                              r"not adapt.*\['c_attn', 'c_fc', 'c_proj'\]"):
            resolve_target_modules(model, targets)
    # an entry PEFT matches by its dotted suffix is not refused
    assert resolve_target_modules(model, ["attn.c_attn", "mlp.c_proj"]) == ["attn.c_attn", "mlp.c_proj"]
    with pytest.raises(ConfigError, match=r"\['mlp.c_attn'\] not found"):
        resolve_target_modules(model, ["attn.c_attn", "mlp.c_attn"])


def test_a_preset_that_does_not_match_the_model_says_which_preset():
    from lorasweep.presets import resolve_target_modules

    model = _tiny("gpt2")
    model.config.model_type = "opt"  # claims OPT, has GPT-2's modules
    with pytest.raises(ConfigError, match=r"\['q_proj', 'k_proj', 'v_proj'\] \(the attention preset for model type "
                                          r"'opt'\) not found in GPT2LMHeadModel"):
        resolve_target_modules(model, "attention")


def test_merge_verify_and_switch_use_the_tokenization_training_used(tiny_config, tiny_data, tiny_model, tmp_path):
    """A tokenizer that adds a BOS token and has no pad token (as many do): training pads with EOS and TRL
    tokenizes with the special tokens. The merge must save that tokenizer, and verify / switch must score the
    held-out examples as training did: switch's base loss equals the training run's own base evaluation."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from lorasweep.adapters import merge_run, switch_adapters, verify_run
    from lorasweep.train import train_run

    model_dir = tmp_path / "bos-nopad"
    shutil.copytree(tiny_model, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.pad_token is None and tok("x")["input_ids"][0] == tok.bos_token_id

    cfg = tiny_config(max_steps=2, evals=1)
    cfg["model"]["name_or_path"] = str(model_dir)
    spec = run_spec(cfg, "lora-r8")
    out = tmp_path / "run"
    train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2)
    merged = merge_run(spec, out / "model", tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(merged).pad_token == tok.eos_token
    result = verify_run(spec, out / "model", merged, tiny_data["eval"], tmp_path / "verify.json", n_prompts=4,
                        max_new_tokens=2)
    assert result["within_tolerance"]
    n = 6
    sw = switch_adapters(spec, {"lora-r8": str(out / "model")}, tiny_data["eval"], tmp_path / "switch.json",
                         n_prompts=n)
    base = json.loads((out / "eval_losses.json").read_text())["base"][:n]  # eval-split order
    assert sw["unload_restores_base_exactly"]
    assert sw["base_eval_loss"] == pytest.approx(sum(r["loss_sum"] for r in base) / sum(r["tokens"] for r in base),
                                                 rel=1e-5)


@pytest.mark.parametrize("run", ["lora-r8", "qlora-r8"])
def test_a_merge_computes_what_base_plus_adapter_computes_and_verify_refuses_one_that_does_not(
        run, tiny_config, tiny_data, tmp_path):
    """merge -> verify on a freshly trained adapter: the merged model gives base + adapter's logits (QLoRA: merged
    onto the dequantized 4-bit base it trained on, not the original weights). And verify really compares the
    two: the untrained base saved as a 'merge' is out of tolerance and fails the job."""
    from safetensors.torch import load_file

    from lorasweep.adapters import MergeMismatch, load_base, merge_run, verify_run
    from lorasweep.train import load_tokenizer, train_run

    spec = run_spec(tiny_config(max_steps=4, evals=1), run)
    out = tmp_path / "run"
    train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2)
    # QLoRA's adapter trains in fp32 like LoRA's (TRL would cast it to bf16): the pair differs by the base alone
    assert {str(t.dtype) for t in load_file(out / "model" / "adapter_model.safetensors").values()} == {"torch.float32"}
    merged = merge_run(spec, out / "model", tmp_path / "merged")
    v = verify_run(spec, out / "model", merged, tiny_data["eval"], tmp_path / "verify.json", n_prompts=4,
                   max_new_tokens=4, trained_losses=out / "eval_losses.json")
    assert v["within_tolerance"] and v["greedy_identical"] and v["max_abs_logit_diff"] <= 1e-3, v
    assert v["eval_loss_merged"] == pytest.approx(v["eval_loss_adapter"], abs=1e-4)
    # the saved adapter computes what the trained model computed on the same examples (fp32 on the CPU: closely)
    assert v["eval_loss_in_training"] == pytest.approx(v["eval_loss_adapter"], rel=1e-5)

    wrong = tmp_path / "not-merged"
    load_base(spec).save_pretrained(wrong, safe_serialization=True)
    load_tokenizer(spec).save_pretrained(wrong)
    with pytest.raises(MergeMismatch, match="do not deploy this merge"):  # a QLoRA merge too: both sides fp32
        verify_run(spec, out / "model", wrong, tiny_data["eval"], tmp_path / "bad.json", n_prompts=4,
                   max_new_tokens=4)


def test_a_gpt2_qlora_adapter_merges_onto_its_conv1d_layers_and_a_merge_that_does_not_load_back_fails(
        tiny_config, tiny_data, tiny_gpt2, tmp_path):
    """GPT-2's linear layers are Conv1D (weight [in, out]); dequantizing its 4-bit base makes them nn.Linear
    ([out, in]), whose weights then saved under Conv1D's names transposed: the merged model did not load. The merge
    keeps the base's own layers (each 4-bit weight dequantized into them) and reproduces base + adapter; and a
    merge that saves something that does not load back fails in merge, not later in verify."""
    from safetensors.torch import load_file

    from lorasweep.adapters import MergeMismatch, check_saved, load_base, merge_run, verify_run
    from lorasweep.train import train_run

    cfg = tiny_config(max_steps=2, evals=1)
    cfg["model"]["name_or_path"] = str(tiny_gpt2)
    spec = run_spec(cfg, "qlora-r8")
    out = tmp_path / "run"
    train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2)
    merged = merge_run(spec, out / "model", tmp_path / "merged")
    assert load_file(merged / "model.safetensors")["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    v = verify_run(spec, out / "model", merged, tiny_data["eval"], tmp_path / "verify.json", n_prompts=4,
                   max_new_tokens=2)
    assert v["within_tolerance"] and v["greedy_identical"] and v["max_abs_logit_diff"] <= 1e-5, v

    dequantized = load_base(spec, quantized=True).dequantize()  # what merge saved before: nn.Linear's layout
    dequantized.save_pretrained(tmp_path / "transposed", safe_serialization=True)
    with pytest.raises(MergeMismatch, match="does not load back"):
        check_saved(dequantized, tmp_path / "transposed")


def test_the_adapter_stages_read_adapters_onto_the_cpu_where_cuda_is_visible(tiny_config, tiny_data, tmp_path,
                                                                             monkeypatch):
    """merge, verify, switch and samples run on the CPU beside training jobs that hold the GPU: PEFT would read
    adapter weights onto the device its infer_device() names ("cuda" wherever CUDA is visible). Here it names
    CUDA on a machine without one: a load that follows it fails."""
    import peft.peft_model

    from lorasweep.adapters import merge_run, sample_runs, switch_adapters, verify_run
    from lorasweep.train import train_run

    spec = run_spec(tiny_config(max_steps=2, evals=1), "lora-r8")
    out = tmp_path / "run"
    train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2)
    monkeypatch.setattr(peft.peft_model, "infer_device", lambda: "cuda")
    merged = merge_run(spec, out / "model", tmp_path / "merged")
    verify_run(spec, out / "model", merged, tiny_data["eval"], tmp_path / "verify.json", n_prompts=2, max_new_tokens=2)
    switch_adapters(spec, {"lora-r8": str(out / "model")}, tiny_data["eval"], tmp_path / "switch.json", n_prompts=2)
    sample_runs({"lora-r8": spec}, {"lora-r8": str(out / "model")}, tiny_data["eval"], tmp_path / "samples.json",
                n=1, max_new_tokens=2)


def test_verify_and_switch_score_the_eval_examples_training_scored(tiny_config, tiny_data, tiny_model, tmp_path):
    """TRL leaves out an eval example whose prompt alone fills max_length (no response token to score); verify and
    switch kept it, so their examples were not training's and the loss in training (the report's "in training")
    was missing for every run. They take the first examples training evaluated."""
    from transformers import AutoTokenizer

    from lorasweep.adapters import merge_run, switch_adapters, verify_run
    from lorasweep.data import read_jsonl
    from lorasweep.train import train_run

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [len(tok(r["prompt"])["input_ids"]) for r in read_jsonl(tiny_data["eval"])]
    max_length = max(prompts[:3])  # the longest of the first three prompts fills it: no response token left
    assert min(prompts[:3]) < max_length
    spec = run_spec(tiny_config(max_steps=2, evals=1, max_length=max_length), "lora-r8")
    out = tmp_path / "run"
    m = train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2)
    assert m["eval_examples_dropped_too_long"] >= 1
    merged = merge_run(spec, out / "model", tmp_path / "merged")
    v = verify_run(spec, out / "model", merged, tiny_data["eval"], tmp_path / "verify.json", n_prompts=4,
                   max_new_tokens=2, trained_losses=out / "eval_losses.json")
    assert v["prompts"] == 4
    assert v["eval_loss_in_training"] == pytest.approx(v["eval_loss_adapter"], rel=1e-5)
    sw = switch_adapters(spec, {"lora-r8": str(out / "model")}, tiny_data["eval"], tmp_path / "switch.json",
                         n_prompts=4)
    base = json.loads((out / "eval_losses.json").read_text())["base"][:4]  # the examples training scored
    assert sw["examples"] == 4
    assert sw["base_eval_loss"] == pytest.approx(sum(r["loss_sum"] for r in base) / sum(r["tokens"] for r in base),
                                                 rel=1e-5)


def test_the_loss_in_training_is_compared_only_on_the_same_examples(tmp_path):
    from lorasweep.adapters import in_training

    losses = tmp_path / "eval_losses.json"
    losses.write_text(json.dumps({"final": [{"loss_sum": 6.0, "tokens": 3}, {"loss_sum": 2.0, "tokens": 2},
                                            {"loss_sum": 9.0, "tokens": 4}]}))
    assert in_training(losses, {"tokens": [3, 2]}) == pytest.approx(8.0 / 5)
    assert in_training(losses, {"tokens": [3, 4]}) is None  # an example left out in training shifts them
    assert in_training(tmp_path / "none.json", {"tokens": [3]}) is None


def test_the_merge_check_compares_every_weight_bit_for_bit_from_digests(tiny_model, tmp_path):
    """merge_run lets the merged model go before loading the saved one back (one model in memory, not two): the
    check compares digests of every tensor's bytes, so one changed bit is named, and a diverged run's NaNs,
    saved as computed, pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorasweep.adapters import MergeMismatch, check_saved, tensor_digests

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    name, weight = next((n, p) for n, p in model.named_parameters() if n.endswith("k_proj.weight"))
    with torch.no_grad():
        weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "saved")
    check_saved(tensor_digests(model), tmp_path / "saved")  # NaN saved as NaN: the same bytes
    check_saved(model, tmp_path / "saved")
    with torch.no_grad():
        weight[0, 1] = torch.nextafter(weight[0, 1], torch.tensor(1.0))  # one unit in the last place
    with pytest.raises(MergeMismatch, match=f"other weights than the merge computed: {name}"):
        check_saved(tensor_digests(model), tmp_path / "saved")


def test_greedy_samples_stop_where_the_models_positions_end(tiny_data, tmp_path):
    """A prompt near the model's last position (an OPT with 32 positions, training.max_length at that limit):
    generation stops at the limit instead of failing in the position embedding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasweep import tiny
    from lorasweep.adapters import greedy

    path = tiny.build_tiny_model_from_jsonl(tiny_data["train"], tmp_path / "short", max_positions=32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = " ".join(["word"] * 200)
    prompt = tok.decode(tok(prompt)["input_ids"][:28], skip_special_tokens=True)
    n = len(tok(prompt)["input_ids"])
    assert 24 <= n <= 32
    texts = greedy(model, tok, [prompt, " ".join(["word"] * 200)], max_new_tokens=24)
    assert len(tok(texts[0], add_special_tokens=False)["input_ids"]) <= 32 - n + 1 and texts[1] == ""


def test_verify_refuses_an_adapter_that_does_not_compute_what_the_run_trained(tiny_config, tiny_data, tmp_path):
    """The merge check compares the saved adapter with its own merge, so an adapter changed after training (an
    edited lora_alpha, another run's adapter, a damaged file) merged and verified as fine, and NaN weights read as a
    diverged run. verify compares base + adapter with the eval loss the run measured at its end on the same
    examples, and fails naming both; a run whose own last evaluation was not finite is still a diverged run. An
    adapter file that does not load fails naming its folder."""
    import math

    from safetensors.torch import load_file, save_file

    from lorasweep.adapters import AdapterMismatch, merge_run, verify_run
    from lorasweep.provenance import SAVED_MODEL_PATTERNS, files_fingerprint
    from lorasweep.train import train_run

    spec = run_spec(tiny_config(max_steps=4, evals=1), "lora-r8")
    out = tmp_path / "run"
    train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2)
    adapter, trained = out / "model", {"trained_losses": out / "eval_losses.json",
                                       "trained_metrics": out / "metrics.json"}

    def verify(name):
        merged = merge_run(spec, adapter, tmp_path / name)
        return verify_run(spec, adapter, merged, tiny_data["eval"], tmp_path / f"{name}.json", n_prompts=4,
                          max_new_tokens=2, **trained)

    v = verify("merged")
    assert v["adapter_as_trained"] and v["training_precision"] == "fp32" and v["in_training_rel_tolerance"] == 1e-4
    assert v["adapter_files_as_saved"] is True

    config_bytes = (adapter / "adapter_config.json").read_bytes()
    config = json.loads(config_bytes)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    with pytest.raises(AdapterMismatch, match=r"lora-r8: base \+ adapter gives eval loss .* the run measured .* at "
                                              r"the end of training \(fp32; tolerance 0.0001 relative\): the adapter "
                                              r"in .* does not compute what the model that trained computed"):
        verify("alpha")
    (adapter / "adapter_config.json").write_bytes(config_bytes)
    # after 16-bit training (its evaluation rounded; the bound not measured on a GPU): warned of and recorded
    bf16 = tmp_path / "bf16_metrics.json"
    bf16.write_text(json.dumps({**json.loads(trained["trained_metrics"].read_text()), "precision": "bf16"}))
    # training's own evaluation 5% away (as a changed adapter would be), recorded in bf16
    losses = json.loads(trained["trained_losses"].read_text())
    off = tmp_path / "off_eval_losses.json"
    off.write_text(json.dumps({**losses, "final": [{**r, "loss_sum": 1.05 * r["loss_sum"]} for r in losses["final"]]}))
    v = verify_run(spec, adapter, merge_run(spec, adapter, tmp_path / "bf16"), tiny_data["eval"],
                   tmp_path / "bf16.json", n_prompts=4, max_new_tokens=2, trained_losses=off, trained_metrics=bf16)
    assert v["adapter_as_trained"] is False and v["in_training_rel_tolerance"] == 2e-2, v
    with pytest.raises(AdapterMismatch, match=r"\(fp32; tolerance 0.0001 relative\)"):  # the same, after fp32
        verify_run(spec, adapter, tmp_path / "bf16", tiny_data["eval"], tmp_path / "fp32.json", n_prompts=4,
                   max_new_tokens=2, trained_losses=off, trained_metrics=trained["trained_metrics"])
    # after 16-bit training a small change (alpha 1% up) sits within the loss bound, as another rank's adapter of
    # the same sweep did (bf16 tiny sweep: 6e-3 relative): the files training saved, fingerprinted, tell it
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1.01 * config["lora_alpha"]}))
    with pytest.raises(AdapterMismatch, match=rf"lora-r8: the adapter in {adapter} is not the one training saved: "
                                              r"its files' fingerprint is \w{12}, training recorded \w{12} "
                                              r"\(saved_model_files_sha256 in .*retrain it: snakemake --forcerun"):
        verify_run(spec, adapter, tmp_path / "bf16", tiny_data["eval"], tmp_path / "bf16-alpha.json", n_prompts=4,
                   max_new_tokens=2, trained_losses=trained["trained_losses"], trained_metrics=bf16)
    (adapter / "adapter_config.json").write_bytes(config_bytes)

    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    save_file({**weights, name: torch.full_like(weights[name], float("nan"))}, adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatch, match="gives eval loss nan .* the run measured"):  # not "the run diverged"
        verify("nan")

    losses = json.loads(trained["trained_losses"].read_text())  # a run that did diverge: its last evaluation NaN
    trained["trained_losses"] = tmp_path / "diverged_eval_losses.json"
    trained["trained_losses"].write_text(json.dumps(
        {**losses, "final": [{**r, "loss_sum": float("nan")} for r in losses["final"]]}))
    diverged = tmp_path / "diverged_metrics.json"  # and its NaN weights the ones it saved
    diverged.write_text(json.dumps({**json.loads(trained["trained_metrics"].read_text()), "saved_model_files_sha256":
                                    files_fingerprint(adapter, cache_path=None, patterns=SAVED_MODEL_PATTERNS)}))
    trained["trained_metrics"] = diverged
    v = verify("diverged")
    assert v["diverged"] and v["within_tolerance"] is None and v["adapter_as_trained"] is None
    assert math.isnan(v["eval_loss_adapter"])

    data = (adapter / "adapter_model.safetensors").read_bytes()  # a file cut short: named, with the way to redo it
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterMismatch, match=f"the adapter saved in {adapter} does not load: SafetensorError: .* "
                                              f"retrain its run: snakemake --forcerun {out / 'metrics.json'}"):
        merge_run(spec, adapter, tmp_path / "cut")


def test_a_qlora_merges_log_leaves_out_transformers_note_on_dequantizing(tiny_config, tmp_path):
    """Merging a QLoRA adapter dequantizes its 4-bit base (model.dequantize()), where transformers logs "The modules
    are dequantized in torch.float32 and casted to torch.float32." once per process, through its own handler: the
    one line in the merge job's log that was no message of lorasweep's (a review). Run in a fresh process, as a job
    is: the note is logged once per process."""
    import subprocess
    import sys
    import textwrap

    spec = run_spec(tiny_config(), "qlora-r8")
    log = tmp_path / "merge.log"
    script = textwrap.dedent(f"""
        import json
        from lorasweep.adapters import dequantized_base
        from lorasweep.logs import script_logging
        with script_logging({str(log)!r}) as say:
            base = dequantized_base(json.loads({json.dumps(json.dumps(spec))}))
            say.info("dequantized: %s", type(base.model.decoder.layers[0].self_attn.q_proj).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert "dequantized: Linear" in text and "dequantized in" not in text, text
