"""Speed never changes what is learned: the batching levers lorasweep uses leave the loss of every example as is."""

import pytest
import torch

from lorasweep import speed
from lorasweep.data import read_jsonl


def _collate(tokenizer, rows, max_length=128):
    """TRL's own collator (the one the runs use) on labels built as TRL builds them: -100 on the prompt."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    feats = []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = (p + c)[:max_length]
        feats.append({"input_ids": ids, "labels": ([-100] * len(p) + c)[:max_length]})
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(feats)


def _loss_sums(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return (nll * (labels != -100)).sum(1), (labels != -100).sum(1)


def test_padding_and_length_grouping_do_not_change_any_examples_loss(tiny_model, tiny_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = read_jsonl(tiny_data["train"])[:6]
    with torch.no_grad():
        batched, n_batched = _loss_sums(model, _collate(tok, rows))  # padded to the longest of six
        alone = [_loss_sums(model, _collate(tok, [r])) for r in rows]  # no padding at all
        regrouped, _ = _loss_sums(model, _collate(tok, [rows[i] for i in (5, 3, 1)]))  # other batch-mates
    assert (batched.new_tensor([len(set(map(len, tok([r["prompt"] + r["completion"] for r in rows])["input_ids"])))])
            > 1).all()  # lengths really differ, so the batch really is padded
    for i, (s, n) in enumerate(alone):
        assert n.item() == n_batched[i].item()
        assert batched[i].item() == pytest.approx(s.item(), rel=1e-5, abs=1e-4)
    assert regrouped.tolist() == pytest.approx([batched[5].item(), batched[3].item(), batched[1].item()], rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("run", ["full", "lora-r8"])
def test_a_right_padded_batch_without_its_mask_gives_every_example_the_same_loss_and_gradients(
        tiny_config, tiny_model, tiny_data, attn, run):
    """Training feeds right-padded batches without their attention mask (positions instead): causal attention
    already keeps every real token from the padding after it. Every example's loss and every gradient must be
    what the masked batch gives, with SDPA and eager attention, for full fine-tuning and LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasweep.config import run_spec
    from lorasweep.train import attach_lora
    from lorasweep.trainer import without_padding_mask

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    if run != "full":
        spec = run_spec(tiny_config(), run)
        model = attach_lora(model, {**spec, "lora": {**spec["lora"], "dropout": 0.0}})
    model.eval()  # no dropout: the two passes must see the same network
    batch = _collate(tok, read_jsonl(tiny_data["train"])[:6])
    assert (batch["attention_mask"] == 0).any()  # really padded
    unmasked = without_padding_mask(batch)
    assert "attention_mask" not in unmasked and unmasked["position_ids"].shape == batch["input_ids"].shape

    def losses_and_grads(b):
        model.zero_grad()
        logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"),
                       position_ids=b.get("position_ids")).logits[:, :-1]
        labels = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        sums = (nll * (labels != -100)).sum(1)
        sums.sum().backward()
        return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    masked, g_masked = losses_and_grads(batch)
    plain, g_plain = losses_and_grads(unmasked)
    torch.testing.assert_close(plain, masked, rtol=1e-5, atol=1e-4)
    for name in g_masked:
        torch.testing.assert_close(g_plain[name], g_masked[name], rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_runs_longest_first_and_keeps_every_result_in_split_order(tiny_config, tiny_data, tiny_model,
                                                                             tmp_path):
    """Eval batches are length-sorted (little padding); each example's loss still lands at its place in the
    split: it equals that example scored alone."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datasets import Dataset

    from lorasweep.config import run_spec
    from lorasweep.train import train_run
    from lorasweep.trainer import MeasuredSFTTrainer

    tokenized = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 7, 5, 7, 1)]})
    assert MeasuredSFTTrainer._get_eval_sampler(None, tokenized) == [1, 3, 2, 0, 4]  # longest first, ties in order

    cfg = tiny_config(max_steps=1, eval_batch_size=16)
    train_run(run_spec(cfg, "full"), tiny_data["train"], tiny_data["eval"], tmp_path, threads=2)
    base = json.loads((tmp_path / "eval_losses.json").read_text())["base"]  # the untrained model: tiny_model
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = read_jsonl(tiny_data["eval"])
    assert len(base) == len(rows)
    with torch.no_grad():
        for r, e in zip(rows, base):
            s, n = _loss_sums(model, _collate(tok, [r], max_length=cfg["training"]["max_length"]))
            assert e["tokens"] == n.item()
            assert e["loss_sum"] == pytest.approx(s.item(), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("run,method", [("full", "full"), ("lora-r8", "lora"), ("qlora-r8", "qlora")])
def test_benchmark_config_holds_exactly_the_one_run(run, method):
    from lorasweep.config import run_names, run_spec
    from lorasweep.speed import single_run_config

    cfg = single_run_config("m", "t.jsonl", run, lr=1e-4, device="cpu", seed=3, batch_size=4)
    assert run_names(cfg) == [run]
    spec = run_spec(cfg, run)
    assert spec["method"] == method and spec["learning_rate"] == 1e-4 and spec["training"]["batch_size"] == 4
    assert (spec["quantization"] is not None) == (method == "qlora")
    assert cfg["training"]["cudnn_attention"] is False  # variable-length batches: see the schema's description


def test_benchmark_config_names_what_it_takes_for_a_variant_run():
    from lorasweep.config import ConfigError
    from lorasweep.speed import single_run_config

    with pytest.raises(ConfigError, match="give adapter options .* as lora settings"):
        single_run_config("m", "t.jsonl", "lora-r8-dora", lr=1e-4, device="cpu", seed=3)  # was int('8-dora')
    with pytest.raises(ConfigError, match="not a run name"):
        single_run_config("m", "t.jsonl", "lora8", lr=1e-4, device="cpu", seed=3)


def _train_fast(tiny_config, tiny_data, out, **how):
    from lorasweep.config import run_spec
    from lorasweep.train import train_run

    spec = run_spec(tiny_config(max_steps=6, evals=1, logging_steps=1), "full")
    return train_run(spec, tiny_data["train"], tiny_data["eval"], out, threads=2,
                     operational={"checkpoint_steps": 0, **how})


@pytest.mark.slow
def test_padding_to_a_multiple_changes_the_shapes_not_what_is_learned(tiny_config, tiny_data, tmp_path):
    """pad_to_multiple_of (fewer shapes for torch.compile): every batch is padded up to a multiple of 64, the
    same tokens are counted and the same losses come out, to floating-point rounding."""
    plain = _train_fast(tiny_config, tiny_data, tmp_path / "plain")
    padded = _train_fast(tiny_config, tiny_data, tmp_path / "padded", pad_to_multiple_of=64)
    assert padded["pad_to_multiple_of"] == 64 and plain["pad_to_multiple_of"] is None
    assert padded["train_tokens_padded"] % (64 * 8) == 0 and plain["train_tokens_padded"] % (64 * 8) != 0
    assert padded["train_tokens_padded"] > plain["train_tokens_padded"]
    for k in ("train_tokens_nonpad", "train_tokens_labelled", "train_samples"):
        assert padded[k] == plain[k], k
    assert padded["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-4)
    assert padded["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-4)


@pytest.mark.slow
def test_torch_compile_trains_a_compiled_step_and_learns_the_same(tiny_config, tiny_data, tmp_path):
    """training.torch_compile really compiles (dynamo captured graphs) and leaves the losses as they were."""
    import torch._dynamo

    eager = _train_fast(tiny_config, tiny_data, tmp_path / "eager", pad_to_multiple_of=64)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _train_fast(tiny_config, tiny_data, tmp_path / "compiled", pad_to_multiple_of=64, torch_compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert compiled["torch_compile"] is True and eager["torch_compile"] is False
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-3)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], abs=1e-3)


@pytest.mark.slow
def test_regional_compilation_compiles_the_layers_without_graph_breaks_and_learns_the_same(tiny_config, tiny_data,
                                                                                        tmp_path):
    """torch_compile_regional compiles the decoder layers and leaf modules, not the forward around them: none of
    the graph breaks that TRL's chunked loss causes in a whole-model compile, and the same losses as eager."""
    import torch._dynamo

    eager = _train_fast(tiny_config, tiny_data, tmp_path / "eager", pad_to_multiple_of=64)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    regional = _train_fast(tiny_config, tiny_data, tmp_path / "regional", pad_to_multiple_of=64,
                           torch_compile=True, torch_compile_regional=True)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] > 0
    assert dict(counters["graph_break"]) == {}
    assert regional["torch_compile"] is True and regional["torch_compile_regional"] is True
    assert regional["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-3)
    assert regional["eval_loss"] == pytest.approx(eager["eval_loss"], abs=1e-3)


def test_host_reads_counts_values_read_back_and_data_sized_results_only():
    """What makes a GPU's host wait: values handed to Python, and outputs whose size depends on the data.
    Slicing, integer indexing and arithmetic do not."""
    from lorasweep.speed import HostReads

    t = torch.arange(6.0)
    with HostReads() as reads:
        (t * 2).sum().item()
        if t.max() > 2:
            int(t[0])
        t[t > 2], t.nonzero(), torch.unique(t)
        t[1:3], t[torch.tensor([0, 1])], t + 1, t.shape[0]
    methods = sorted(method for (_, _, method), n in reads.sites.items() for _ in range(n))
    assert methods == ["__bool__", "__getitem__", "__int__", "item", "nonzero", "unique"]
    assert {phase for phase, _, _ in reads.sites} == {"other"} and reads.in_steps() == {}


def test_the_step_bound_adds_the_flops_at_peak_to_each_weights_bytes_at_full_bandwidth():
    from lorasweep import speed

    # bytes per weight and step, counted by hand (bf16 autocast / fp32): trainable 6 cast + 2 + 2 products + 2
    # gradient + 6 cast back + 12 clipping + 28 AdamW; frozen 6 cast + 2 + 2; 4-bit 2 x (0.5625 + 2 + 2)
    assert speed.bytes_per_step(1, 0, 0, half=True) == 58 and speed.bytes_per_step(1, 0, 0, half=False) == 52
    assert speed.bytes_per_step(0, 1, 0, half=True) == 10 and speed.bytes_per_step(0, 1, 0, half=False) == 8
    assert speed.bytes_per_step(0, 0, 1, half=True) == 9.125
    # a frozen weight stored in 16 bits (training.frozen_weights_16bit) is only read by the two products
    assert speed.bytes_per_step(0, 3, 0, half=True, frozen_16bit=2) == 10 + 2 * 4
    assert speed.bytes_per_step(0, 2, 0, half=True, micro_batches=2, frozen_16bit=2) == 2 * 2 * 4
    # a second micro-batch: its own casts, products and gradient (18), added to the first (12); one update
    assert speed.bytes_per_step(1, 0, 0, half=True, micro_batches=2) == 58 + 18 + 12
    n, tokens, h100 = 331_196_416, 930, "NVIDIA H100 80GB HBM3"
    full = speed.step_ceiling(total_params=n, trainable_params=n, quantized_params=0,
                              tokens_per_step=tokens, half=True, gpu_name=h100)
    compute, memory = 6 * n * tokens / 989e12, 58 * n / 3.35e12
    assert full["step_floor_s"] == pytest.approx(compute + memory)
    assert full["mfu"] == pytest.approx(compute / (compute + memory)) and 0.24 < full["mfu"] < 0.25
    assert full["tokens_per_s"] == pytest.approx(tokens / (compute + memory))
    # at the tokens per step where traffic costs as much time as arithmetic, the bound is exactly 50%
    half_way = speed.step_ceiling(total_params=n, trainable_params=n, quantized_params=0,
                                  tokens_per_step=full["tokens_per_step_at_half"], half=True, gpu_name=h100)
    assert half_way["mfu"] == pytest.approx(0.5)
    # a frozen base moves 10 bytes a weight, not 58: LoRA's bound is several times full fine-tuning's
    lora = speed.step_ceiling(total_params=n, trainable_params=786_432, quantized_params=0,
                              tokens_per_step=tokens, half=True, gpu_name=h100)
    assert lora["tokens_per_s"] > 3 * full["tokens_per_s"]
    # ... and 4 stored in 16 bits: the run's parameter counts carry how many are (ceiling_metrics reads them)
    base_16bit = speed.ceiling_metrics({"total_params": n, "trainable_params": 786_432,
                                        "frozen_16bit_params": n - 786_432 - 51_463_168}, tokens, True, h100)
    assert base_16bit["step_floor_memory_ms"] == pytest.approx(
        1e3 * (58 * 786_432 + 10 * 51_463_168 + 4 * (n - 786_432 - 51_463_168)) / 3.35e12)
    assert base_16bit["tokens_per_s_ceiling"] > lora["tokens_per_s"]
    # FLOPs per token: 2 forward + 2 for the activations' gradient per weight, 2 more per trainable weight
    assert speed.flops_per_token(n, n) == 6 * n and speed.flops_per_token(n, 786_432) == 4 * n + 2 * 786_432
    assert lora["step_compute_s"] == pytest.approx((4 * n + 2 * 786_432) * tokens / 989e12)
    assert speed.mfu(n, n, 1000.0, h100) == pytest.approx(6 * n * 1000 / 989e12)
    # fp32 training is not measured against the 16-bit peak (TF32 off: several times lower)
    assert speed.mfu(n, n, 1000.0, h100, half=False) is None
    assert speed.step_ceiling(total_params=n, trainable_params=n, quantized_params=0, tokens_per_step=tokens,
                              half=False, gpu_name=h100) is None
    # the card's variant matters; an unknown GPU has no bound (and no MFU), never a guess
    assert speed.peak_flops("NVIDIA H100 PCIe") == 756e12 and speed.memory_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert speed.memory_bandwidth("NVIDIA A100-SXM4-80GB") > speed.memory_bandwidth("NVIDIA A100-SXM4-40GB")
    assert speed.peak_flops("Tesla T4") == 65e12 and speed.peak_flops("Tesla V100-PCIE-32GB") == 112e12  # fp16
    for unknown in ("NVIDIA A10G", "NVIDIA GeForce RTX 4090", None):
        assert speed.peak_flops(unknown) is None
        assert speed.step_ceiling(total_params=n, trainable_params=n, quantized_params=0,
                                  tokens_per_step=tokens, half=True, gpu_name=unknown) is None
        assert speed.ceiling_metrics({"total_params": n, "trainable_params": n}, tokens, True, unknown) == {}


def test_mfu_counts_the_lm_head_on_labelled_positions_only_and_no_embedding_table(tiny_config, tiny_data, tmp_path):
    """TRL's fused LM head projects only the positions with a label (the response, under completion_only_loss),
    and embedding tables are looked up, not multiplied: the FLOPs MFU divides by are those the step computes."""
    from transformers import AutoModelForCausalLM

    from lorasweep.config import operational, run_spec
    from lorasweep.train import train_run

    cfg = tiny_config(max_steps=2, evals=1)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]["name_or_path"])
    f = speed.flop_params(model)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    positions = model.model.decoder.embed_positions.weight.numel()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # OPT ties them
    assert f == {"embedding_table_params": positions, "embedding_table_trainable_params": positions,
                 "lm_head_params": vocab * hidden, "lm_head_trainable_params": vocab * hidden}
    n = sum(p.numel() for p in model.parameters())
    body = n - positions - vocab * hidden
    assert speed.flops_per_token(n, n, **f, labelled_share=0.4) == pytest.approx(6 * body + 0.4 * 6 * vocab * hidden)
    assert speed.flops_per_token(n, n, **f, labelled_share=1.0) == 6 * n - 6 * positions
    # a run's metrics carry what MFU needs; a LoRA run trains neither the head nor a table
    m = train_run(run_spec(cfg, "lora-r8"), tiny_data["train"], tiny_data["eval"], tmp_path / "run", threads=2,
                  operational=operational(cfg))
    assert (m["lm_head_params"], m["lm_head_trainable_params"], m["embedding_table_trainable_params"]) == (
        vocab * hidden, 0, 0)
    assert 0 < m["train_tokens_labelled"] < m["train_tokens_nonpad"]
