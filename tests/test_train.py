"""Real training steps on the tiny model: no mocked trainer anywhere."""

import json
import math

import pytest
import torch

from lorasweep.config import run_spec
from lorasweep.train import NoGPUError, count_batch_tokens, resolve_device, train_run


def _train(tiny_config, tiny_data, tmp_path, run, **training):
    spec = run_spec(tiny_config(**training), run)
    out = tmp_path / run
    metrics = train_run(spec, tiny_data["train"], tiny_data["eval"], out, data_summary_path=tiny_data["summary"],
                        threads=2)
    return metrics, out


def test_full_finetuning_learns_and_writes_everything(tiny_config, tiny_data, tmp_path):
    m, out = _train(tiny_config, tiny_data, tmp_path, "full", max_steps=20)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m, default=str))
    assert m["eval_loss"] < m["base_eval_loss"] - 0.5  # the loss really falls
    assert m["train_steps"] == 20 and m["train_samples"] == 20 * 8
    assert m["trainable_params"] == m["total_params"] and m["saved_model_kind"] == "full model"
    assert (out / "model" / "model.safetensors").stat().st_size == m["saved_model_bytes"]
    assert 0 < m["train_runtime_s"] <= m["train_wall_s"]
    assert m["peak_rss_bytes"] > 0 and "peak_cuda_allocated_bytes" not in m  # absent on the CPU, never 0
    assert m["train_tokens_labelled"] < m["train_tokens_nonpad"] <= m["train_tokens_padded"]
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    evals = [h for h in history if "eval_loss" in h]
    # one record per evaluation (untrained, then every eval_steps); the curves end where the metrics say
    assert [h["step"] for h in evals] == sorted({h["step"] for h in evals}) and evals[0]["step"] == 0
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


def test_count_batch_tokens_on_a_hand_built_batch():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]),
    }
    counts = count_batch_tokens(batch)
    assert counts == {"tokens_padded": 10, "tokens_nonpad": 8, "tokens_labelled": 5, "samples": 2}
    prompt_tokens = 1 + 2  # fed, but without a label
    assert counts["tokens_nonpad"] == counts["tokens_labelled"] + prompt_tokens


def test_cuda_requested_without_gpu_stops_with_guidance():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(NoGPUError) as err:
        resolve_device("cuda")
    assert "config/tiny.yaml" in str(err.value) and "training.device" in str(err.value)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_unknown_target_module_is_caught_against_the_model(tiny_config, tiny_data, tmp_path):
    from lorasweep.config import ConfigError

    cfg = tiny_config()
    cfg["methods"]["lora"]["target_modules"] = ["q_proj", "query_key_value"]
    spec = run_spec(cfg, "lora-r8")
    with pytest.raises(ConfigError, match=r"\['query_key_value'\] not found in OPTForCausalLM"):
        train_run(spec, tiny_data["train"], tiny_data["eval"], tmp_path / "x")
    assert not (tmp_path / "x" / "metrics.json").exists()


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
    m, _ = _train(tiny_config, tiny_data, tmp_path, "lora-r8", max_steps=steps_per_epoch, max_length=1024)
    lengths = [len(tok(r["prompt"] + r["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"])
               for r in rows]
    prompt_lengths = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert m["train_samples"] == len(rows)
    assert m["train_tokens_nonpad"] == sum(lengths)
    assert m["train_tokens_labelled"] == sum(lengths) - sum(prompt_lengths)
    assert m["train_tokens_padded"] >= m["train_tokens_nonpad"]
    assert m["padding_share_pct"] == pytest.approx(100 * (1 - sum(lengths) / m["train_tokens_padded"]))


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
    assert m["eval_peak_rss_bytes"] > m["peak_rss_bytes"] + 10 * 2**20
    assert m["peak_rss_bytes"] >= m["rss_at_load_bytes"]
    assert "evaluations during training excluded" in m["memory_measured"]


def test_every_evaluation_computes_in_the_training_precision(tiny_model, tiny_data, tmp_path):
    """accelerate puts autocast around the model's forward only once training starts; the untrained model's
    evaluation must be scored in the same precision as the later ones, or base-vs-final differences carry a
    precision change. Here one training step at learning rate 0 leaves the weights as they were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from lorasweep.data import load_splits
    from lorasweep.train import _trainer_class, per_example_losses

    train, evals = load_splits(tiny_data["train"], tiny_data["eval"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=0.0, use_cpu=True, bf16=True,
                     report_to="none", per_device_train_batch_size=2, max_length=128, save_strategy="no")
    trainer = _trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=evals,
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
        assert m["predicted_peak_bytes"] == sum(m[f"predicted_{k}_bytes"] for k in
                                                ("weights", "gradients", "optimizer", "activations"))
        assert m["memory_model_compared_to"] == "peak_rss_bytes - rss_at_load_bytes"
        assert math.isfinite(m["memory_model_error_pct"])
    assert full["predicted_weights_bytes"] == 4 * full["total_params"]
    assert qlora["predicted_weights_bytes"] < lora["predicted_weights_bytes"]  # 4-bit base weights


def test_tokenization_runs_once_per_sweep_and_is_reused(tiny_config, tiny_data, tmp_path):
    """The first run tokenizes into results/data/cache; the next run (same tokenizer, max_length) only loads it."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for k in ("train", "eval"):
        shutil.copy(tiny_data[k], data / f"{k}.jsonl")

    def cache_files():
        return sorted(p.name for p in (data / "cache").rglob("cache-*.arrow"))

    cfg = tiny_config(max_steps=2)
    first = train_run(run_spec(cfg, "full"), data / "train.jsonl", data / "eval.jsonl", tmp_path / "full")
    written = cache_files()
    assert len(written) >= 4  # EOS, tokenize, labels, truncate ... for train and eval
    second = train_run(run_spec(cfg, "lora-r8"), data / "train.jsonl", data / "eval.jsonl", tmp_path / "lora")
    assert cache_files() == written  # nothing recomputed
    assert second["train_tokens_nonpad"] == first["train_tokens_nonpad"]
    assert second["train_info"]["data_prep_s"] >= 0 and first["train_info"]["data_prep_s"] >= 0
    # a different max_length is a different preparation: computed once more
    train_run(run_spec(tiny_config(max_steps=2, max_length=64), "full"), data / "train.jsonl", data / "eval.jsonl",
              tmp_path / "short")
    assert set(cache_files()) > set(written)


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
    on the real model (bytes autograd saves), and the prediction follows."""
    from transformers import AutoModelForCausalLM

    from lorasweep.memory_model import predict

    models = {impl: AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl).train()
              for impl in ("sdpa", "eager")}
    cfg = models["sdpa"].config
    b, s = 4, 128
    ids = torch.randint(0, cfg.vocab_size, (b, s))

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return total

    probs = cfg.num_hidden_layers * cfg.num_attention_heads * s * s * b * 4  # fp32 attention probabilities
    assert saved_bytes(models["eager"]) - saved_bytes(models["sdpa"]) >= probs
    pred = {k: predict(m, 0, b, s, "fp32")["predicted_activations_bytes"] for k, m in models.items()}
    # 5·a·s²·b bytes at 16-bit, doubled in fp32: 2.5 times the fp32 probabilities
    assert pred["eager"] - pred["sdpa"] == pytest.approx(2.5 * probs, abs=2)
