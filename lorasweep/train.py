"""One training run (full fine-tuning, LoRA or QLoRA) with TRL's SFTTrainer, measured honestly.

The recipe, top to bottom (``train_run``): resolve device and precision; load tokenizer and model (4-bit for
QLoRA); attach the LoRA adapter; build the SFTTrainer on prompt/completion data (loss on the response only,
``sft_config``); evaluate the untrained model; reset the memory baseline; train; evaluate; save; write metrics
last. The trainer and its callback are in ``lorasweep.trainer``, the eval measure in ``lorasweep.scoring``,
checkpoint and out-of-memory bookkeeping in ``lorasweep.resume``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError, hub_offline
from . import memory_model, speed
from .memory import PeakMemory, rss_bytes
from .provenance import (SAVED_MODEL_PATTERNS, MachineShare, files_fingerprint, git_state, hardware, hardware_label,
                         honour_umask, model_files, package_versions)
from .resume import (EVAL_OOM_FILE, FAILED_FILE, OOM_FILE, StopOnSignal, Stopped, atomic_write_json, batch_after_oom,
                     find_resumable, logged_loss_sum, rebase_peaks, rebase_sums, record_eval_oom, record_oom,
                     refuse_after_eval_oom, resume_key)
from .scoring import perplexity, token_weighted

log = logging.getLogger("lorasweep.train")


class NoGPUError(RuntimeError):
    """The configuration asks for CUDA and none is present."""


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says what was tried."""


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "auto":
        return "cpu"
    raise NoGPUError(
        "training.device is 'cuda' but no CUDA GPU is visible (torch.cuda.is_available() is False), so "
        "training stops here.\n"
        "  - To run the whole sweep on this machine in a few minutes, use the tiny preset:\n"
        "      snakemake --cores 4 --resources gpu=1 --configfile config/tiny.yaml\n"
        "  - To train this experiment on the CPU anyway (slow: hours or days for opt-350m), set the config "
        "key training.device to cpu, e.g. in an override file passed as a second --configfile."
    )


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision != "auto":
        if device == "cpu" and precision == "fp16":
            raise ConfigError("training.precision = 'fp16' is not supported on the CPU; use fp32 or bf16")
        return precision
    if device == "cpu":
        return "fp32"
    # bf16 where the GPU computes it (Ampere on); torch's default also answers yes where it is only emulated
    # (V100, T4: slow), where lorasweep trains in fp16
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    name = spec["model"]["name_or_path"]
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=spec["model"]["trust_remote_code"],
                                            **_revision(spec))
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint(name, "tokenizer", e)) from e
    if tok.eos_token is None:
        # TRL appends EOS to every response (its add_eos fails on None) and pads with it where there is no pad token
        raise ConfigError(
            f"model.name_or_path = {name!r}: its tokenizer has no EOS token"
            + (" and no pad token" if tok.pad_token is None else "")
            + ": training ends every response with EOS (the model learns to stop there) and pads with it where there "
            "is no pad token. Give the tokenizer one (eos_token in its tokenizer_config.json, or tok.eos_token = "
            "'...' and tok.save_pretrained(DIR)), a token the model's vocabulary has")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _revision(spec: dict) -> dict:
    """``from_pretrained``'s revision argument where ``model.revision`` is set (a hub model's branch, tag or commit)."""
    revision = spec["model"].get("revision")
    return {"revision": revision} if revision else {}


def _load_hint(name: str, what: str, e: Exception) -> str:
    where = "local directory" if os.path.isdir(name) else "hub id (or a local path that does not exist)"
    if isinstance(e, ValueError) and "trust_remote_code" in str(e):  # transformers' refusal to run the model's code
        code = sorted(p.name for p in Path(name).glob("*.py")) if os.path.isdir(name) else []
        # AutoTokenizer refuses only its own code (a model config it cannot build falls back to a plain one there)
        whose, config = (("tokenizer", "tokenizer_config.json") if what == "tokenizer"
                         else ("architecture", "config"))
        return (f"could not load the {what} from model.name_or_path = {name!r}, read as a {where}: its {whose} "
                f"is not one transformers knows, and its {config} names code of its own to build it (auto_map"
                + (f": {', '.join(code)}" if code else "") + "), which lorasweep does not run. To train it, read that "
                "code and set model.trust_remote_code: true, which runs it in every job that loads the model.")
    offline = hub_offline()
    return (f"could not load the {what} from model.name_or_path = {name!r}, read as a {where}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            "Without network access, download the model elsewhere (`hf download <id> --local-dir DIR`) and either set "
            "model.name_or_path to that local directory or "
            + (f"put it in the local Hugging Face cache ({offline} is set: nothing is downloaded)."
               if offline
               else "set HF_HUB_OFFLINE=1 to use the local Hugging Face cache."))


def load_model(spec: dict, device: str, precision: str):
    """Model in fp32 (mixed precision comes from autocast); 4-bit nf4/fp4 base for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = spec["model"]["name_or_path"]
    # safetensors only: a pickle checkpoint (.bin) can run code when loaded
    kwargs = {"dtype": torch.float32, "trust_remote_code": spec["model"]["trust_remote_code"], "use_safetensors": True,
              **_revision(spec)}
    q = spec["quantization"]
    if q:
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q["quant_type"],
            bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint(name, "model", e)) from e
    except (ImportError, RuntimeError) as e:  # bitsandbytes missing, or built without this machine's device
        if not q or "bitsandbytes" not in str(e):
            raise
        raise ModelLoadError(
            f"run {spec['run']}: QLoRA loads its base model in 4 bits with bitsandbytes, which cannot do that on this "
            f"machine ({device}): {type(e).__name__}: {str(e).splitlines()[0]}\n"
            "Install a bitsandbytes build for it (https://huggingface.co/docs/bitsandbytes/main/en/installation), or "
            "leave QLoRA out of the sweep (an override file with `methods: {qlora: {ranks: []}}`), which retrains "
            "none of the other runs.") from e
    if q and device == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights into an inference-only layout the first time a layer runs
        # in eval mode on an AVX512-BF16 CPU and never converts them back, so training after the baseline
        # evaluation fails ("a view of a leaf Variable ... in-place"). Keep the canonical layout.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if not q and device == "cuda":
        model.to("cuda")
    return model


MUTATING_INITS = ("olora", "pissa")  # initialisations that move part of the base weight into the adapter


def max_positions(model_config) -> tuple[str, int] | None:
    """The longest sequence the model's position embeddings cover, and the config key that says so
    (``max_position_embeddings``; GPT-2's ``n_positions``); None when the config gives neither."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return getattr(text, "attribute_map", {}).get(key, key), value  # GPT-2's config.json: n_positions
    return None


def lora_target_layers(model, spec: dict, targets=None) -> dict:
    """The layers PEFT will adapt for the run, ``{name: module}``: its own matching of ``target_modules`` (a preset
    resolved, :func:`lorasweep.presets.resolve_target_modules`, unless ``targets`` is it); all-linear, every linear
    layer but the output head, as PEFT expands it."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from .presets import linear_kinds, resolve_target_modules

    if targets is None:
        targets = resolve_target_modules(model, spec["lora"]["target_modules"])
    modules = dict(model.named_modules())
    if targets == "all-linear":
        kinds = linear_kinds()
        head = model.get_output_embeddings()
        return {n: m for n, m in modules.items() if n and isinstance(m, kinds) and m is not head}
    cfg = lora_config(spec, targets)
    return {n: m for n, m in modules.items() if n and check_target_module_exists(cfg, n)}


def largest_init_rank(model, spec: dict) -> tuple[int, str, tuple] | None:
    """The largest rank OLoRA / PiSSA can initialise on the run's target layers, with the layer that limits it and
    its weight's shape: both take r directions of each weight (QR, SVD), and a weight of shape [out, in] has
    min(out, in) of them."""
    layers = {n: m for n, m in lora_target_layers(model, spec).items() if getattr(m, "weight", None) is not None}
    if not layers:
        return None
    name = min(layers, key=lambda n: min(layers[n].weight.shape))
    shape = tuple(layers[name].weight.shape)
    return min(shape), name, shape


def check_model_settings(spec: dict, pad_to_multiple_of: int | None = None) -> None:
    """What the run's settings ask of the model, checked from its config before any data is loaded or any step
    trained: ``training.max_length`` within the model's positions (beyond them an embedding lookup fails in the
    first batch: GPT-2's ``IndexError: index out of range in self``), and so the longest batch
    ``training.pad_to_multiple_of`` pads up to (max_length rounded up to its multiple); for OLoRA / PiSSA, a rank the
    target weights have (:func:`largest_init_rank`; PEFT would train the whole run and then fail converting the
    saved adapter). PEFT's default initialisation takes any rank (A random, B zero): not checked. LoRA's
    ``target_modules``, on the model's skeleton (:func:`lorasweep.presets.resolve_target_modules`)."""
    from transformers import AutoConfig

    name = spec["model"]["name_or_path"]
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=spec["model"]["trust_remote_code"],
                                            **_revision(spec))
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint(name, "model config", e)) from e
    limit = max_positions(config)
    max_length = spec["training"]["max_length"]
    if limit and max_length > limit[1]:
        raise ConfigError(f"training.max_length = {max_length} is more than model.name_or_path = {name!r} takes: "
                          f"its config's {limit[0]} is {limit[1]} (its positions end there); set training.max_length "
                          f"to at most {limit[1]}")
    padded = -(-max_length // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else max_length
    if limit and padded > limit[1]:  # TRL pads a batch up to the multiple past max_length
        fits = limit[1] // pad_to_multiple_of * pad_to_multiple_of
        raise ConfigError(f"training.pad_to_multiple_of = {pad_to_multiple_of} pads a batch of training.max_length = "
                          f"{max_length} tokens to {padded}, more than model.name_or_path = {name!r} takes: its "
                          f"config's {limit[0]} is {limit[1]} (its positions end there, and the first batch that long "
                          "fails); " + (f"set training.max_length to at most {fits}, or " if fits else "")
                          + f"set a pad_to_multiple_of of at most {limit[1]} that max_length rounds up to within it")
    lora = spec["lora"]
    if not lora:
        return
    from .presets import meta_skeleton, resolve_target_modules

    # shapes only: no weights, no memory (a trust_remote_code model's code at the model's revision)
    try:
        skeleton = meta_skeleton(config, spec["model"]["trust_remote_code"], spec["model"].get("revision"))
    except Exception as e:  # noqa: BLE001 - an architecture that does not build on the meta device
        if lora.get("init", "default") in MUTATING_INITS:
            raise
        # PEFT's default init needs no shapes: the target modules are checked when the model has loaded, as before
        log.info("target_modules are checked once the model has loaded (no meta-device skeleton of it: %s: %s)",
                 type(e).__name__, e)
        return
    resolve_target_modules(skeleton, lora["target_modules"])  # modules the model has, not its output layer
    if lora.get("init", "default") in MUTATING_INITS:
        largest = largest_init_rank(skeleton, spec)
        if largest and lora["r"] > largest[0]:
            raise ConfigError(
                f"methods.lora.ranks: run {spec['run']} asks for rank {lora['r']} with init {lora['init']} "
                f"(methods.lora.init, or the ranks entry's init), but {lora['init']} initialises A and B from r "
                f"directions of each target weight, and {largest[1]} (weight {list(largest[2])}) has {largest[0]}: "
                f"the largest rank the target weights of model.name_or_path = {name!r} allow is {largest[0]}. "
                f"Use a rank of at most {largest[0]}, or init: default (any rank)")


def lora_config(spec: dict, target_modules):
    """PEFT's LoraConfig for the run: rank, alpha, dropout, targets, init, rsLoRA, DoRA."""
    from peft import LoraConfig

    lora = spec["lora"]
    init = lora.get("init", "default")
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=target_modules, bias="none", task_type="CAUSAL_LM",
                      init_lora_weights=True if init == "default" else init,
                      use_rslora=lora.get("use_rslora", False), use_dora=lora.get("use_dora", False))


def attach_lora(model, spec: dict):
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .presets import conv1d_class, resolve_target_modules

    targets = resolve_target_modules(model, spec["lora"]["target_modules"])
    config = lora_config(spec, targets)
    # GPT-2's Conv1D keeps its weight [in, out]: LoRA on it needs fan_in_fan_out, which PEFT otherwise turns on
    # itself with a UserWarning in the job's log (a 4-bit base's layers are bitsandbytes' Linear4bit, [out, in])
    layers = lora_target_layers(model, spec, targets).values()
    conv1d = conv1d_class()
    config.fan_in_fan_out = bool(layers) and conv1d is not None and all(isinstance(m, conv1d) for m in layers)
    if spec["quantization"]:
        # activation checkpointing is the Trainer's (SFTConfig's activation_checkpointing, transformers 5's
        # activation_checkpointing_enable); PEFT's would call the deprecated gradient_checkpointing_enable first
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config)


def _dora_bases(model) -> set[int]:
    """ids of the base layers a DoRA adapter wraps (a DoRA layer keeps a magnitude vector per adapter)."""
    return {id(m.get_base_layer()) for m in model.modules() if getattr(m, "lora_magnitude_vector", None)}


def store_frozen_weights_16bit(model, precision: str) -> int:
    """Keep the frozen weights and biases of the model's linear layers (``nn.Linear``, GPT-2's ``Conv1D``: a LoRA
    run's base) in the 16-bit dtype training computes in; returns how many values now sit in 16 bits.

    With 16-bit autocast every product casts its fp32 weight to 16 bits, and autocast keeps no cast of a weight
    without a gradient: a frozen base is cast anew at every forward pass, one kernel per weight and bias
    (2 x 6 a decoder layer of OPT), reading 4 bytes a weight and writing 2. Stored in 16 bits, the product reads
    the very values the cast made (round to nearest), so losses and gradients are bitwise the same (a test
    compares them) for half the weights' memory and none of those kernels. Left in fp32: trainable parameters,
    anything outside a linear layer (embeddings, layer norms) and a weight shared with one (OPT's LM head is its
    token embedding: a 16-bit embedding would carry the residual stream in 16 bits), 4-bit layers (QLoRA's
    base: :func:`feed_4bit_layers_16bit` gives them 16-bit inputs instead), the base layers a DoRA adapter wraps
    (PEFT upcasts their weight to normalise base + adapter in fp32: a 16-bit copy would change that norm; the
    layers DoRA leaves alone are converted), and everything when training computes in fp32.
    """
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is None:
        return 0
    from .presets import linear_kinds

    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    # nn.Linear, and GPT-2's Conv1D (its product is one addmm, which autocast computes in 16 bits as it does
    # Linear's); exactly these types: bitsandbytes' 4-bit layers subclass Linear
    kinds = linear_kinds()
    dora_bases = _dora_bases(model)  # their base layer stays in fp32
    n = 0
    for m in model.modules():
        if type(m) not in kinds or id(m) in dora_bases:
            continue
        for p in m.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32 and owners[id(p)] == 1:
                p.data = p.data.to(half)
                n += p.numel()
    if n and next(model.parameters()).device.type == "cpu":
        # On the CPU the checkpoint stays memory-mapped while any weight still points into it, and every page
        # read (all of them, by the conversion) counts in the process's RSS: copying the frozen fp32 rest
        # (embeddings, layer norms: ~8% of opt-350m) lets the mapping go, or the RSS would hold the fp32 file
        # beside the 16-bit copies (+0.5 GiB for opt-350m's shape instead of -0.6).
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.clone()
    return n


def feed_4bit_layers_16bit(model, precision: str) -> int:
    """Give QLoRA's 4-bit layers their input in the 16-bit dtype training computes in, so that their output stays in
    it, as a 16-bit LoRA base's does; returns how many layers now do.

    bitsandbytes casts a 4-bit layer's input to its compute dtype, computes, and casts the output back to the
    input's dtype. Under autocast the input of q/k/v_proj and fc1 is a layer norm's fp32 output, so those outputs
    came back in fp32: the activations after them were kept for the backward pass in fp32 (QLoRA's peak above
    LoRA's on a GPU, for 40% of its weights), and the fp32 copies cost casts forward and backward. Cast before the
    layer instead (a forward pre-hook on each 4-bit layer, acting under autocast), the product reads the same
    16-bit input and the output is the 16-bit result itself, not its fp32 copy. The weight is dequantized straight
    to that dtype for the backward product too (bitsandbytes dequantizes to the dtype the model was loaded in,
    fp32, then casts: the same rounding, one operation and an fp32 copy of the weight fewer). Together 20% fewer
    operations a step at opt-350m's depth (``benchmarks/op_count.py``). QLoRA then trains as LoRA over the
    dequantized weights with a 16-bit base (bitwise in a test on the CPU; on CUDA up to the rounding of
    bitsandbytes' own product kernel), so qlora-rN against lora-rN compares the 4-bit weights and not also fp32
    activations. The adapter's branch still reads the layer's own input, as LoRA's does.

    Left alone: fp32 training, forward passes outside autocast (OPT's fp32 LM head after its 4-bit project_out
    could not take 16 bits), and the layers a DoRA adapter wraps (DoRA reads their base in fp32, as
    :func:`store_frozen_weights_16bit`). The 16-bit dequantization lasts as long as the model: merging the adapter
    into this in-memory base would start from 16-bit weights (lorasweep merges in a job of its own, from the files).
    """
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is None:
        return 0
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0

    def to_16bit(module, args):
        x = args[0] if args else None
        if x is not None and x.dtype != half and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            return (x.to(half), *args[1:])
        return None  # nothing to change

    dora_bases = _dora_bases(model)
    n = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and id(m) not in dora_bases:
            m.register_forward_pre_hook(to_16bit)
            m.weight.quant_state.dtype = half  # what dequantize_4bit returns: the backward's weight, in 16 bits
            n += 1
    return n


def frozen_base_16bit(model, precision: str) -> dict:
    """``training.frozen_weights_16bit``: a LoRA base stored in the 16-bit dtype training computes in
    (:func:`store_frozen_weights_16bit`) and QLoRA's 4-bit layers fed it (:func:`feed_4bit_layers_16bit`); what
    each did, as the run's metrics record it."""
    return {"frozen_16bit_params": store_frozen_weights_16bit(model, precision),
            "four_bit_16bit_layers": feed_4bit_layers_16bit(model, precision)}


def save_initial_adapter(model, spec: dict, path: Path) -> Path | None:
    """For OLoRA / PiSSA: save the adapter as initialised, so that the trained one can be converted back.

    These inits subtract A0 B0 from the base weight; the trained adapter only fits that residual base. PEFT
    converts it to a plain LoRA adapter for the *original* base (Delta W = A B - A0 B0, rank 2r) when it is
    given the initial adapter, saved with ``init_lora_weights=True`` so that loading it mutates nothing.
    """
    if not spec["lora"] or spec["lora"].get("init", "default") not in MUTATING_INITS:
        return None
    cfg = model.peft_config["default"]
    init, cfg.init_lora_weights = cfg.init_lora_weights, True
    try:
        model.save_pretrained(str(path))
    finally:
        cfg.init_lora_weights = init
    return path


def save_trained(trainer, model_dir: Path, initial: Path | None) -> None:
    """Save the model (adapter or full) with its tokenizer; an OLoRA / PiSSA adapter converted to plain LoRA."""
    if initial is None:
        trainer.save_model(str(model_dir))
        return
    with warnings.catch_warnings():
        # the conversion loads the initial adapter beside the trained one, and PEFT warns of its own doing that
        # ("OLoRA changes the base weights of the model and should thus not be used with other adapters"): the
        # adapter it saves is a plain LoRA one, for the original base
        warnings.filterwarnings("ignore", message=r"(OLoRA|PiSSA) changes the base weights", category=UserWarning,
                                module=r"peft\.peft_model\Z")
        trainer.model.save_pretrained(str(model_dir), path_initial_model_for_weight_conversion=str(initial))
    trainer.processing_class.save_pretrained(str(model_dir))


def adapted_modules(model) -> str:
    """The module names PEFT actually adapted, comma-separated (a preset or all-linear resolved), as the metrics
    and the report show them: PEFT resolves all-linear into every layer's full module path (14 for a 2-layer
    Llama, one per layer and projection); a name whose every module is adapted is given once, by its last
    component (``q_proj``). Entries that were not full paths (a configured list, dotted suffixes included) are
    kept as configured, and a full path whose namesakes are not all adapted stays a full path."""
    t = model.peft_config["default"].target_modules
    if isinstance(t, str):
        return t
    full = [n for n, _ in model.get_base_model().named_modules() if n]
    paths, out = set(full) & set(t), set(t) - set(full)
    for name in {p.rsplit(".", 1)[-1] for p in paths}:
        every = {n for n in full if n.rsplit(".", 1)[-1] == name}
        out |= {name} if every <= paths else paths & every
    return ",".join(sorted(out))


def count_parameters(model) -> dict:
    """Trainable, 4-bit (QLoRA's base) and total parameters; a packed 4-bit weight counts as the weights it
    represents."""
    trainable = total = quantized = 0
    for p in model.parameters():
        n = p.numel()
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            n = math.prod(qs.shape)
            quantized += n
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable_params": trainable, "total_params": total, "quantized_params": quantized,
            "trainable_share_pct": 100.0 * trainable / total if total else None}


def examples_cut(dataset, max_length: int, eos_token_id: int | None) -> int:
    """Examples of a tokenized split (TRL's: EOS appended, then cut to ``max_length``) whose response was cut:
    as long as ``max_length`` and not ending in EOS. They are trained and scored on the response's start only."""
    import pyarrow.compute as pc

    n = 0
    for table in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=4096):
        col = table.column("input_ids").combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        last = col.values.to_numpy(zero_copy_only=False)[col.offsets.to_numpy()[1:] - 1]  # masked where empty
        n += int(((lengths >= max_length) & (last != eos_token_id)).sum())
    return n


def examples_with_special_text(dataset, tokenizer) -> int:
    """Examples of a split (prompt / completion text) that hold the text of one of the tokenizer's special tokens
    (OPT's ``</s>``: also the close of an HTML strikethrough): the tokenizer reads that text as the token itself, so
    the example trains an EOS (or a pad) in the middle of its text, and TRL appends no EOS to a completion that ends
    with it. Nothing in the text says so; the run warns."""
    specials = [t for t in tokenizer.all_special_tokens if t]
    if not specials:
        return 0
    return sum(any(t in p or t in c for t in specials)
               for p, c in zip(dataset["prompt"], dataset["completion"]))


def count_4bit_layers(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def compile_args(setting) -> dict:
    """``training.torch_compile`` as TrainingArguments: false, true / "default" (inductor's default mode) or
    a torch.compile mode name."""
    if setting is False or setting is None:
        return {"torch_compile": False}
    mode = None if setting is True or setting == "default" else str(setting)
    return {"torch_compile": True, "torch_compile_mode": mode}


def use_regional_compilation(trainer) -> None:
    """Compile the model's repeated blocks (its decoder layers) and its other leaf modules one by one instead of
    the whole forward: accelerate's regional compilation, which the Trainer applies when it prepares the model.
    Every decoder layer runs the same compiled code (compiled once, not once per layer), and the forward around
    them stays eager: TRL's chunked loss over the LM head, which breaks whole-model graphs, is not traced."""
    plugin = trainer.accelerator.state.dynamo_plugin
    if not trainer.args.torch_compile or plugin is None:
        raise RuntimeError("torch_compile_regional without torch_compile: the Trainer set up no torch.compile")
    plugin.use_regional_compilation = True


def total_steps(n_train: int, training: dict) -> int:
    if training["max_steps"] > 0:
        return training["max_steps"]
    per_epoch = math.ceil(math.ceil(n_train / training["batch_size"]) / training["grad_accum"])
    return max(1, math.ceil(per_epoch * training["epochs"]))


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


def sft_config(spec: dict, training: dict, out_dir: Path, device: str, precision: str, steps: int,
               eval_steps: int):
    """TRL's SFTConfig for one run: every setting that decides what is learned comes from the run's spec and
    ``training``; the others keep the step free of waits for the device (see README, Speed)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=steps,
        learning_rate=spec["learning_rate"],
        per_device_train_batch_size=training["batch_size"],
        per_device_eval_batch_size=training["eval_batch_size"],
        gradient_accumulation_steps=training["grad_accum"],
        lr_scheduler_type=training["lr_scheduler"],
        warmup_steps=training["warmup_ratio"],  # below 1: a share of the steps (transformers 5's warmup_ratio)
        weight_decay=training["weight_decay"],
        logging_steps=min(training["logging_steps"], eval_steps),
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps" if training["checkpoint_steps"] else "no",
        save_steps=training["checkpoint_steps"] or None,
        save_total_limit=None,  # the Recorder deletes older checkpoints once the newest is complete
        report_to="none",
        disable_tqdm=True,
        seed=spec["seed"],
        data_seed=spec["seed"],
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        max_length=training["max_length"],
        completion_only_loss=True,
        packing=False,
        # TRL's SFTConfig turns activation checkpointing and bf16 ON by default; both are explicit here.
        activation_checkpointing=training["gradient_checkpointing"],
        train_sampling_strategy="group_by_length" if training["group_by_length"] else "random",
        # lorasweep counts the tokens itself (TokenCounts) without waiting for the device each step; the Trainer's
        # count and its NaN/inf filter on the logged loss would each read a value back from the GPU every step.
        # Unfiltered, a diverging run logs its NaN loss instead of hiding it in an average.
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        dataset_num_proc=None,
        pad_to_multiple_of=training.get("pad_to_multiple_of"),
        # On CUDA each batch goes to the GPU as an asynchronous copy from pinned memory (the Trainer pins it
        # by default). A blocking copy, the default, waits for the GPU to finish all the work queued before
        # it, the last step's included: profiled on an H200 that was 3 waits a step (one per batch tensor),
        # each leaving the GPU idle while the host then queues the next step's first kernels.
        accelerator_config={"non_blocking": True} if device == "cuda" else None,
        **compile_args(training.get("torch_compile", False)),
    )


def plan_steps(n_train: int, training: dict) -> tuple[int, int]:
    """The run's optimizer steps and the interval between evaluations: ``training.evals`` of them, the last at
    the end, or fewer where no whole-step interval gives that many (10 steps, 6 evaluations: every 2 steps, 5
    of them; see ``say_evaluations``)."""
    steps = total_steps(n_train, training)
    return steps, max(1, math.ceil(steps / training["evals"]))


def say_evaluations(steps: int, eval_steps: int, evals: int) -> None:
    """A warning where the interval of ``plan_steps`` gives another count of evaluations than training.evals asks
    (the Trainer evaluates every ``eval_steps`` steps, and at the last step)."""
    made = math.ceil(steps / eval_steps)
    if made != evals:
        log.warning("training.evals = %d: %d evaluations, every %d steps of %d (no whole-step interval gives %d "
                    "of them, the last at the end)", evals, made, eval_steps, steps, evals)


def examples_changed(trainer, train_ds, eval_ds, tokenizer, max_length: int) -> dict:
    """The examples ``max_length`` or the tokenizer changes, counted per split (metrics.json keeps the counts) and
    warned of: left out by TRL (the prompt alone fills max_length: no response token left to learn or score), cut
    at max_length (their start kept: trained and scored without the response's end), holding the text of a
    special token (OPT's ``</s>``: read as that token, an EOS mid-response). A split left empty stops the run."""
    n_train, n_eval = len(trainer.train_dataset), len(trainer.eval_dataset)
    dropped = {"train_examples_dropped_too_long": len(train_ds) - n_train,
               "eval_examples_dropped_too_long": len(eval_ds) - n_eval}
    empty = [k for k, n in (("training", n_train), ("eval", n_eval)) if n == 0]
    if empty:  # nothing to train or score: the sampler failed on an empty split (IndexError: Invalid key: 0 ...)
        raise ConfigError(
            f"training.max_length = {max_length} leaves no {' and no '.join(empty)} example: every "
            f"prompt of the {' and '.join(empty)} split fills it ({len(train_ds)} training and {len(eval_ds)} eval "
            "examples, each left with no response token, which TRL drops); set a larger training.max_length")
    if any(dropped.values()):
        log.warning("%d training and %d eval example(s) left out: their prompt alone fills training.max_length = %d "
                    "tokens, leaving no response token (TRL drops them); a larger max_length keeps them",
                    *dropped.values(), max_length)
    cut = {f"{k}_examples_cut_at_max_length": examples_cut(ds, max_length, tokenizer.eos_token_id)
           for k, ds in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset))}
    if any(cut.values()):
        log.warning("%d training and %d eval example(s) are longer than training.max_length = %d tokens: their "
                    "responses are cut there (trained and scored without their end)", *cut.values(), max_length)
    special = {f"{k}_examples_with_special_token_text": examples_with_special_text(ds, tokenizer)
               for k, ds in (("train", train_ds), ("eval", eval_ds))}
    if any(special.values()):
        log.warning("%d training and %d eval example(s) hold the text of one of the tokenizer's special tokens (%s): "
                    "it is tokenized as that token (an EOS or pad inside the text; no EOS appended after a response "
                    "that ends with it), not as text; clean the data if that is not meant", *special.values(),
                    ", ".join(tokenizer.all_special_tokens))
    return {**dropped, **cut, **special}


def run_train_loss(segment_loss: float, n_steps: int, resumed: dict | None, history_path: Path) -> float:
    """The mean training loss over all the run's steps. The Trainer's (``segment_loss``) covers this segment of
    training; a resumed run adds its earlier segments' and writes the run's mean into the Trainer's closing record
    of log_history.jsonl, as in metrics.json. NaN where a checkpoint from an older lorasweep does not tell it."""
    if not resumed:
        return segment_loss
    before = resumed.get("train_loss_sum")
    if before is None:  # a checkpoint from before lorasweep saved it: from the logged losses if they reach it
        before = logged_loss_sum(resumed["history"], resumed["step"])
    loss = (before + segment_loss * (n_steps - resumed["step"])) / n_steps if before is not None else float("nan")
    records = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    history_path.write_text("".join(json.dumps({**r, "train_loss": loss} if "train_loss" in r else r) + "\n"
                                    for r in records))
    return loss


def setting_metrics(spec: dict, training: dict, model, device: str, oom_halvings: int,
                    resumed: dict | None) -> dict:
    """metrics.json's record of how the run trained: its hyperparameters and the settings it ran with."""
    lora, quant = spec["lora"], spec["quantization"]
    return {
        "learning_rate": spec["learning_rate"],
        "lora_alpha": lora["alpha"] if lora else None,
        "lora_dropout": lora["dropout"] if lora else None,
        "target_modules": adapted_modules(model) if lora else None,
        "lora_init": lora.get("init", "default") if lora else None,
        "use_rslora": lora.get("use_rslora", False) if lora else None,
        "use_dora": lora.get("use_dora", False) if lora else None,
        "quant_type": quant["quant_type"] if quant else None,
        "double_quant": quant["double_quant"] if quant else None,
        "gradient_checkpointing": bool(training["gradient_checkpointing"]),
        "batch_size": training["batch_size"],
        "grad_accum": training["grad_accum"],
        "effective_batch": training["batch_size"] * training["grad_accum"],
        "oom_halvings": oom_halvings,
        "resumed_from_step": resumed["step"] if resumed else None,
        "train_segments": (resumed["segments"] if resumed else 0) + 1,
        "max_length": training["max_length"],
        "seed": spec["seed"],
        "torch_compile": training.get("torch_compile", False),
        "torch_compile_regional": bool(training.get("torch_compile_regional")),
        "pad_to_multiple_of": training.get("pad_to_multiple_of"),
        "eval_batch_size": training["eval_batch_size"],  # operational: finished runs keep the one they ran with
        "cudnn_attention": bool(training.get("cudnn_attention")) if device == "cuda" else None,
    }


def speed_metrics(times: dict, n_steps: int, counts: dict, params: dict, training: dict, precision: str,
                  gpu_name: str | None) -> dict:
    """metrics.json's speed figures: training alone (``times['train_time_s']``: the time of evaluations and of
    writing checkpoints is subtracted), tokens counted without padding, MFU and the step ceiling on a known GPU."""
    train_time = times["train_time_s"]
    tokens_per_s = counts["tokens_nonpad"] / train_time
    half = precision in ("bf16", "fp16")
    # the share of fed tokens the LM head projects (TRL's fused LM head: the positions with a label), for MFU
    labelled_share = counts["tokens_labelled"] / counts["tokens_nonpad"] if counts["tokens_nonpad"] else 1.0
    mfu = speed.mfu(params["total_params"], params["trainable_params"], tokens_per_s, gpu_name, half=half,
                    **speed.flop_shape(params, labelled_share))
    return {
        "train_runtime_s": train_time,
        "train_wall_s": times["elapsed_s"],
        "eval_time_during_train_s": times["eval_time_s"],
        "checkpoint_time_s": times["checkpoint_time_s"],
        "checkpoint_steps": training["checkpoint_steps"],
        "checkpoint_min_interval_s": training.get("checkpoint_min_interval_s"),
        "train_steps": n_steps,
        "train_samples": counts["samples"],
        "train_samples_per_s": counts["samples"] / train_time,
        "train_steps_per_s": n_steps / train_time,
        "train_tokens_nonpad": counts["tokens_nonpad"],
        "train_tokens_padded": counts["tokens_padded"],
        "train_tokens_labelled": counts["tokens_labelled"],
        "train_tokens_nonpad_per_s": tokens_per_s,
        "padding_share_pct": 100.0 * (1 - counts["tokens_nonpad"] / counts["tokens_padded"]),
        # the LM head multiplies only the positions with a label (lorasweep.speed: TRL's fused LM head)
        **({"mfu_pct": 100 * mfu} if mfu is not None else {}),
        # the best this GPU could do at this many tokens a step (lorasweep.speed.step_ceiling); none without one
        **speed.ceiling_metrics(params, counts["tokens_nonpad"] / max(n_steps, 1), half, gpu_name,
                                training["grad_accum"], labelled_share),
    }


def memory_metrics(mem: dict, mem_sums: dict, device: str, rss_before_load: int, predicted: dict) -> dict:
    """metrics.json's memory figures: training's peaks (``mem``, from :class:`lorasweep.memory.PeakMemory`), the
    per-step means, and the memory model's prediction beside them."""
    def mean_of(key):
        total, n = mem_sums.get(key, (0, 0))
        return total / n if n else None

    return {
        **{k: v for k, v in mem.items() if k != "peak_rss_method"},  # CUDA fields are absent on the CPU
        "rss_before_load_bytes": rss_before_load,
        **({"mean_cuda_allocated_bytes": mean_of("cuda_allocated_bytes"),
            "mean_cuda_reserved_bytes": mean_of("cuda_reserved_bytes")} if device == "cuda" else {}),
        "mean_rss_bytes": mean_of("rss_bytes"),
        **predicted,
        **memory_model.compare(predicted, mem),
        "memory_measured": ("CUDA peak allocated/reserved since the counters were reset after model load; "
                            if device == "cuda" else "") + f"peak RSS of the training process ({mem['peak_rss_method']}); "
                           "evaluations during training excluded (their own peaks: eval_peak_*)",
    }


def predicted_memory(model, params: dict, training: dict, max_seq_len: int, precision: str) -> dict:
    """The memory model's prediction for this run's longest batch; empty (and a warning) where its probe fails."""
    # fused_loss: SFTTrainer's loss is TRL's chunked LM head (no full logits), and the probe forwards through it
    try:
        return memory_model.predict(model, params["trainable_params"], training["batch_size"], max_seq_len,
                                    precision, fused_loss=True, grad_accum=training["grad_accum"])
    except Exception as e:  # a model whose probe batches fail must not cost the trained run its metrics
        log.warning("memory model: no prediction for this run (%s: %s)", type(e).__name__, e)
        return {}


def train_run(spec: dict, train_path: str | Path, eval_path: str | Path, out_dir: str | Path,
              data_summary_path: str | Path | None = None, threads: int | None = None,
              workflow_dir: str | Path | None = None, operational: dict | None = None, gpu_peers=None,
              callbacks=()) -> dict:
    """Train one run and write ``model/``, ``log_history.jsonl`` and (last) ``metrics.json`` under ``out_dir``.

    ``callbacks``: more ``TrainerCallback`` objects for the Trainer (the benchmarks' step profiler).

    ``gpu_peers`` (the workflow passes ``GpuSlot.peers``) tells how many other training jobs hold a slot on
    this job's GPU; the most seen during training is recorded as ``gpu_jobs_beside_max``."""
    started = datetime.now(timezone.utc)
    from .config import OPERATIONAL_KEYS
    from .config import operational as schema_operational

    # how to run (checkpointing, threads): from the config, not the spec; the schema's defaults otherwise
    # a spec from run_spec holds no operational setting; one built by hand keeps its own over the schema's defaults
    training = {**schema_operational(), **spec["training"], **(operational or {})}
    device = resolve_device(training["device"])  # first: fail before any loading when CUDA is missing
    precision = resolve_precision(training["precision"], device)

    import torch
    from transformers import set_seed

    from .trainer import MeasuredSFTTrainer, Recorder, TokenCounts, finite_log

    if device == "cuda":  # see config.schema.yaml: cuDNN attention re-plans for every new batch shape
        torch.backends.cuda.enable_cudnn_sdp(bool(training.get("cudnn_attention", False)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .data import cache_dir, damaged_cache_dropped, fingerprint, load_splits, preparing_splits

    data_sha = fingerprint(train_path, eval_path)

    def settings_key(t: dict) -> str:
        """The run, its settings (``t``), its data and how it computes (precision "auto" resolves per machine):
        an out-of-memory record or a checkpoint of anything else must not carry over into this run."""
        return resume_key(spec, {**{k: v for k, v in t.items() if k not in OPERATIONAL_KEYS},
                                 "data_sha256": data_sha, "resolved_device": device, "resolved_precision": precision})

    configured = training
    oom_key = settings_key(configured)
    # an evaluation's out-of-memory record holds for its eval batch as well (an operational setting, left out of
    # settings_key): with a smaller one the run tries again
    eval_oom_key = resume_key({"settings": oom_key}, {"eval_batch_size": configured["eval_batch_size"]})
    refuse_after_eval_oom(out_dir, eval_oom_key)
    training, oom_halvings = batch_after_oom(out_dir, configured, oom_key)
    if oom_halvings:
        log.info("an earlier attempt ran out of memory: per-device batch %d x accumulation %d (effective batch kept)",
                 training["batch_size"], training["grad_accum"])
    threads = training.get("threads") or threads
    if threads:  # never more threads than cores: oversubscription slows training and skews timings
        torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
    log.info("run %s: method %s, device %s, precision %s, %d torch threads", spec["run"], spec["method"],
             device, precision, torch.get_num_threads())

    # the settings the model must take (max_length, an OLoRA / PiSSA rank, its tokenizer's EOS), before the data
    tokenizer = load_tokenizer(spec)
    check_model_settings(spec, training.get("pad_to_multiple_of"))
    # under the splits' lock: a damaged cache is deleted while no other job reads or writes it
    with preparing_splits(train_path), damaged_cache_dropped(train_path, eval_path, data_sha):
        train_ds, eval_ds = load_splits(train_path, eval_path, data_sha)  # tokenized once per sweep: see load_splits

    set_seed(spec["seed"])
    rss_before_load = rss_bytes()  # the process (Python, torch, data) before its model: what runs cannot differ in
    model = load_model(spec, device, precision)
    # what it loaded, by content (a hub model's commit read now: another job's download may move main later)
    loaded = model_files(spec["model"]["name_or_path"], spec["model"].get("revision"))
    n4bit = count_4bit_layers(model)
    if spec["quantization"] and n4bit == 0:
        raise RuntimeError("QLoRA run loaded no 4-bit layers: bitsandbytes quantization did not take effect")
    initial_adapter = None
    if spec["lora"]:
        model = attach_lora(model, spec)
        initial_adapter = save_initial_adapter(model, spec, out_dir / "initial_adapter")
    half = (frozen_base_16bit(model, precision) if training.get("frozen_weights_16bit", True)
            else {"frozen_16bit_params": 0, "four_bit_16bit_layers": 0})
    if half["frozen_16bit_params"]:
        log.info("frozen linear weights kept in %s (%d values): autocast casts them to it at every product anyway",
                 precision, half["frozen_16bit_params"])
    if half["four_bit_16bit_layers"]:
        log.info("4-bit layers take and return %s activations (%d layers), as a 16-bit LoRA base does",
                 precision, half["four_bit_16bit_layers"])
    params = {**count_parameters(model), **half, **speed.flop_params(model)}  # the last: what MFU counts
    log.info("parameters: %d trainable of %d (%.3f%%); 4-bit linear layers: %d", params["trainable_params"],
             params["total_params"], params["trainable_share_pct"], n4bit)

    steps, eval_steps = plan_steps(len(train_ds), training)
    args = sft_config(spec, training, out_dir, device, precision, steps, eval_steps)
    # said before it starts: TRL's tokenization of a large dataset takes minutes, with datasets' progress bars off
    log.info("preparing %d train and %d eval examples (tokenized by the sweep's first training job, then read from "
             "its cache)", len(train_ds), len(eval_ds))
    with preparing_splits(train_path) as prep, \
            damaged_cache_dropped(train_path, eval_path, data_sha):  # TRL tokenizes here: one job at a time, then the cache
        trainer = MeasuredSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                     processing_class=tokenizer)
    data_prep_s = prep["prep_s"]
    trainer.eval_oom_record = lambda err: record_eval_oom(out_dir, eval_oom_key, err)  # a retry stops at once
    if training.get("torch_compile_regional"):
        use_regional_compilation(trainer)
    examples = examples_changed(trainer, train_ds, eval_ds, tokenizer, training["max_length"])
    n_train, n_eval = len(trainer.train_dataset), len(trainer.eval_dataset)
    if n_train != len(train_ds):  # the steps of `epochs` count the examples trained on
        steps, eval_steps = plan_steps(n_train, training)
        trainer.args.max_steps, trainer.args.eval_steps = steps, eval_steps
        trainer.args.logging_steps = min(training["logging_steps"], eval_steps)
    say_evaluations(steps, eval_steps, training["evals"])
    if trainer.drop_padding_mask:
        log.info("right-padded batches: training feeds positions instead of the attention mask (causal attention "
                 "already keeps tokens from the padding after them)")
    log.info("datasets ready in %.1fs (%s %s)", data_prep_s,
             "tokenized, cached for the sweep's other runs in" if prep["tokenized"] else "tokenization loaded from",
             cache_dir(train_path, eval_path, data_sha))
    if spec["quantization"]:
        # TRL casts QLoRA adapter weights to bf16 (QLoRA paper's recipe). Keep them in fp32 like the LoRA
        # runs, so that qlora-rN vs lora-rN differs only by the 4-bit base weights.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    key = settings_key(training)  # this attempt's batch: a checkpoint resumes the same optimisation only
    ckpt, resumed = find_resumable(out_dir / "checkpoints", key)
    counts = trainer.token_counts = TokenCounts((resumed or {}).get("counts"))
    memory = trainer.memory = PeakMemory(device)
    machine = MachineShare((resumed or {}).get("machine"))
    recorder = Recorder(out_dir / "log_history.jsonl", counts, memory, resumed, gpu_peers=gpu_peers,
                        trainer=trainer, machine=machine)
    recorder.min_save_interval_s = float(training.get("checkpoint_min_interval_s") or 0)
    trainer.add_callback(recorder)
    for cb in callbacks:
        trainer.add_callback(cb)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the Recorder logs progress; PrinterCallback dumps raw dicts

    if resumed:
        base_eval, base_examples = resumed["base_eval"], resumed["base_examples"]
        recorder.history_path.write_text("".join(json.dumps(r) + "\n" for r in resumed["history"]))
        log.info("resuming from %s (step %d of %d; %d segment(s) before, %.1fs of training kept)", ckpt.name,
                 resumed["step"], steps, resumed["segments"], resumed["train_time_s"])
    else:
        recorder.history_path.write_text("")
        log.info("evaluating the untrained model on %d eval examples", n_eval)
        base_eval = trainer.evaluate()  # logged as the curves' step-0 point by the Recorder
        base_examples = trainer.last_eval_examples
    recorder.extra_state = {"key": key, "base_eval": base_eval, "base_examples": base_examples}
    log.info("untrained eval_loss %.4f; training %s (%d examples, batch %d x accumulation %d)", base_eval["eval_loss"],
             f"steps {resumed['step'] + 1}-{steps} of {steps}" if resumed else f"{steps} steps", n_train,
             training["batch_size"], training["grad_accum"])

    at_load = memory.reset()
    if resumed:  # earlier segments' peaks and per-step sums, on this process's footprint at load
        resumed["peaks"] = rebase_peaks(resumed.get("peaks", {}), resumed.get("baseline"), at_load)
        recorder.prior_mem_sums = rebase_sums(recorder.prior_mem_sums, resumed.get("baseline"), at_load)
    machine.start()
    recorder.stop = StopOnSignal(enabled=bool(training["checkpoint_steps"]))
    try:
        with recorder.stop:
            result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except torch.OutOfMemoryError as e:
        memory.stop()
        raise record_oom(out_dir, configured, oom_halvings, e, oom_key) from e
    except BaseException:
        memory.stop()  # a process that goes on (a benchmark's next run) keeps no sampler thread of this one
        raise
    if recorder.stopped_at is not None:
        memory.stop()
        raise Stopped(f"stopped by {recorder.stop.requested} at step {recorder.stopped_at} of {steps}, after saving "
                      f"checkpoint-{recorder.stopped_at} in {out_dir / 'checkpoints'}: the next attempt resumes from it "
                      "(Snakemake's retry; after Ctrl-C, snakemake run again with --rerun-incomplete)")
    mem = memory.read()
    for k, v in (resumed or {}).get("peaks", {}).items():  # a resumed run's peak is the peak of all its segments
        mem[k] = max(mem.get(k) or 0, v)
    machine_share = machine.stop()
    if recorder.peers_max:
        log.warning("trained beside up to %d other training job(s) on its GPU (training.jobs_per_gpu): its speed "
                    "figures are lower than alone; its losses and memory peaks are its own", recorder.peers_max)
    if machine_share["machine_busy_during_train"]:
        log.warning("other processes used %.0f%% of this machine's CPU while %s trained: its timings are not "
                    "comparable with runs on an idle machine", machine_share["other_processes_cpu_share_pct"],
                    spec["run"])

    history = trainer.state.log_history
    counts = counts.read()
    times = recorder.totals()  # this segment's and earlier segments' (before a crash)
    n_steps = trainer.state.global_step
    train_loss = run_train_loss(result.training_loss, n_steps, resumed, recorder.history_path)
    last_eval = [h for h in history if "eval_loss" in h]
    if not last_eval or last_eval[-1].get("step") != n_steps or not trainer.last_eval_examples:
        final_eval = trainer.evaluate()  # logged by the Recorder
    else:
        final_eval = last_eval[-1]
    losses = [h["loss"] for h in history if "loss" in h]
    final_examples = trainer.last_eval_examples  # the final evaluation's, of the trained model
    eval_loss = token_weighted(final_examples)
    atomic_write_json(out_dir / "eval_losses.json", {
        "what": "per eval example (eval-split order): response-token loss sum and token count",
        "base": base_examples, "final": final_examples})

    model_dir = out_dir / "model"
    save_trained(trainer, model_dir, initial_adapter)
    honour_umask(model_dir)
    if initial_adapter:
        shutil.rmtree(initial_adapter)  # the saved adapter is converted: the initial one has served its purpose

    predicted = predicted_memory(trainer.model, params, training, counts["max_seq_len"], precision)
    hw, versions, git = hardware(device), package_versions(), git_state(workflow_dir)
    metrics = {
        "run": spec["run"],
        "method": spec["method"],
        "rank": spec["rank"],
        "model": spec["model"]["name_or_path"],
        "model_revision": spec["model"].get("revision"),
        **loaded,  # the hub commit and the fingerprint of the files it loaded
        "device": device,
        "hardware": hardware_label(hw),
        "precision": precision,
        **setting_metrics(spec, training, trainer.model, device, oom_halvings, resumed),
        # quality
        "train_loss": train_loss,
        "train_loss_last": losses[-1] if losses else None,
        # training logs (every logging_steps) whose loss or gradient norm was not finite: a diverged run
        "train_logs": len(losses),
        "train_nonfinite_logs": sum(1 for h in history if "loss" in h and not finite_log(h)),
        # eval loss per response token of the eval split (token-weighted, as the paired comparisons); the
        # Trainer's way, a mean of per-batch means, depends on the eval batch size: kept beside it
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss),
        "base_eval_loss": token_weighted(base_examples),
        "eval_loss_batch_mean": final_eval.get("eval_loss_batch_mean"),
        "base_eval_loss_batch_mean": base_eval.get("eval_loss_batch_mean"),  # absent: resumed from an older checkpoint
        **speed_metrics(times, n_steps, counts, params, training, precision, hw.get("gpu_name")),
        **examples,  # examples max_length left out or cut, or holding a special token's text (also in train_info)
        **machine_share,
        # other training jobs on this run's GPU during training (training.jobs_per_gpu > 1); None: not shared
        # out by lorasweep (no GPU, one job per GPU, or a scheduler's own GPU)
        "gpu_jobs_beside_max": recorder.peers_max,
        # parameters and size
        **params,
        "quantized_4bit_layers": n4bit,
        "saved_model_bytes": dir_bytes(model_dir),
        "saved_model_kind": "adapter" if spec["lora"] else "full model",
        # what training saved, by content: verify checks that the adapter it reads is these files
        "saved_model_files_sha256": files_fingerprint(model_dir, cache_path=None, patterns=SAVED_MODEL_PATTERNS),
        **memory_metrics(mem, recorder.mem_sums(), device, rss_before_load, predicted),
        "torch_version": versions["torch"],
        "transformers_version": versions["transformers"],
        "peft_version": versions["peft"],
        "trl_version": versions["trl"],
        "git_commit": git["git_commit"],
        "git_dirty": git["git_dirty"],
        "data_fingerprint_sha256": data_sha,
        # provenance
        "run_info": {"spec": spec, "seed": spec["seed"], "started_utc": started.isoformat(),
                     "finished_utc": datetime.now(timezone.utc).isoformat(),
                     "data_summary": json.loads(Path(data_summary_path).read_text()) if data_summary_path else None},
        "train_info": {"data_prep_s": data_prep_s, "data_prep_wait_s": prep["wait_s"],
                       "data_tokenized": prep["tokenized"], "total_steps_planned": steps, "eval_steps": eval_steps,
                       "memory_at_load": at_load, "train_examples": n_train, "eval_examples": n_eval, **examples},
        "meta_info": {"packages": versions, **git, "hardware": hw},
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    (out_dir / OOM_FILE).unlink(missing_ok=True)
    (out_dir / EVAL_OOM_FILE).unlink(missing_ok=True)
    if not training["keep_checkpoints"] and (out_dir / "checkpoints").is_dir():
        shutil.rmtree(out_dir / "checkpoints")  # the finished model is saved; checkpoints only serve a resume
    log.info("done: train_loss %.4f  eval_loss %.4f  %.1fs  %.1f samples/s  peak RSS %.0f MiB", metrics["train_loss"],
             metrics["eval_loss"], times["train_time_s"], metrics["train_samples_per_s"],
             (mem["peak_rss_bytes"] or 0) / 2**20)
    return metrics


def train_job(config: dict, spec: dict, train_path, eval_path, data_summary_path, out_dir, threads: int | None = None,
              workflow_dir=None, lock_dir=".snakemake/lorasweep-gpu-slots", attempt: int | None = None) -> dict:
    """The workflow's training job: claim a GPU slot (``training.jobs_per_gpu`` per GPU; none for CPU training)
    before CUDA starts, then train the run with the config's operational settings (checkpoints, threads, ...).

    ``attempt``: Snakemake's attempt number (1, then 2, 3 for its retries). A retry of an attempt that failed
    with an error no retry changes stops at once (:func:`lorasweep.resume.refuse_repeated_failure`)."""
    from .config import operational
    from .gpu_slots import GpuSlot
    from .resume import RunLock, record_failure, refuse_repeated_failure

    try:
        refuse_repeated_failure(out_dir, attempt)
        ops = operational(config)
        on_cpu = config["training"]["device"] == "cpu"
        with RunLock(out_dir), \
                GpuSlot(lock_dir, gpus=[] if on_cpu else None, jobs_per_gpu=ops["jobs_per_gpu"]) as slot:
            metrics = train_run(spec, train_path, eval_path, out_dir, data_summary_path=data_summary_path,
                                threads=threads, workflow_dir=workflow_dir, operational=ops, gpu_peers=slot.peers)
    except Exception as e:
        record_failure(out_dir, attempt, e)
        raise
    (Path(out_dir) / FAILED_FILE).unlink(missing_ok=True)
    return metrics
