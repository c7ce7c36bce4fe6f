"""Target-module presets: which linear layers ``target_modules: attention`` adapts, per architecture.

The write-ups adapt OPT's attention projections (q_proj, k_proj, v_proj); the same choice on another
architecture means other module names. Architectures are keyed by ``config.model_type``. One without a
preset takes q_proj, k_proj and v_proj when it has all three (the names most decoders use, OPT's and Llama's
included); otherwise the run stops, naming its linear layers, rather than adapting something else than its
attention (``all-linear`` adapts every linear layer, several times the parameters).
"""

from __future__ import annotations

import logging

from .config import ConfigError

log = logging.getLogger(__name__)

QKV = ["q_proj", "k_proj", "v_proj"]
ATTENTION = {
    "opt": QKV,
    # Llama-style decoders
    "llama": QKV, "mistral": QKV, "mixtral": QKV, "qwen2": QKV, "qwen3": QKV, "gemma": QKV, "gemma2": QKV,
    "gemma3_text": QKV, "phi3": ["qkv_proj"], "phi": QKV, "olmo": QKV, "olmo2": QKV, "smollm3": QKV,
    "granite": QKV, "starcoder2": QKV,
    # fused query-key-value projections
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "gptj": QKV, "gpt_neo": QKV,
}


def conv1d_class():
    """transformers' ``Conv1D`` (GPT-2's linear layers, weight stored [in, out]), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def linear_kinds() -> tuple:
    """The layer types that are linear layers: ``nn.Linear`` (bitsandbytes' 4-bit Linear subclasses it) and GPT-2's
    ``Conv1D``."""
    import torch

    return tuple(k for k in (torch.nn.Linear, conv1d_class()) if k is not None)


def meta_skeleton(config, trust_remote_code: bool = False, revision: str | None = None):
    """The causal LM ``config`` describes, built on the meta device: its layers and shapes, no weights, no memory.

    ``revision``: the hub commit, branch or tag the model is loaded at (``model.revision``). A trust_remote_code
    model's class comes from its repository's code, which ``from_config`` fetches at ``main`` unless told otherwise
    (``from_pretrained`` at the model's revision): offline with only the pinned commit cached it failed, online it
    checked main's modules, not the ones the run trains."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if trust_remote_code and remote and revision:
        kwargs["code_revision"] = revision
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


def output_layer_name(model) -> str | None:
    """Last name component of the model's output layer (``lm_head``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and m is head), None)


def linear_module_names(model) -> list[str]:
    """Last name components of the model's linear layers that an adapter may target (nn.Linear, GPT-2's Conv1D,
    4-bit Linear), the output layer left out (:func:`resolve_target_modules`)."""
    kinds, head = linear_kinds(), output_layer_name(model)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds) and n} - {head})


def resolve_target_modules(model, targets) -> list[str] | str:
    """The module names (or ``'all-linear'``) to pass to PEFT for ``targets``, checked against the model.

    Raises ConfigError naming the missing modules and the model's linear layers when a list or a preset
    does not match the model, or when ``'attention'`` has neither a preset nor q/k/v_proj to take.
    """
    if targets == "all-linear":
        return "all-linear"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    source = ""
    names = [n for n, _ in model.named_modules() if n]
    if targets == "attention":
        if model_type not in ATTENTION:
            if not set(QKV) <= set(linear_module_names(model)):
                raise ConfigError(
                    f"methods.lora.target_modules: 'attention' has no preset for model type {model_type!r} "
                    f"({type(model).__name__}), and the model has no {', '.join(QKV)} to take instead; its linear "
                    f"modules are {linear_module_names(model)}: list its attention projections among them, or use "
                    "'all-linear'")
            log.info("no attention preset for model type %r: adapting its %s", model_type, ", ".join(QKV))
            return list(QKV)
        targets, source = ATTENTION[model_type], f" (the attention preset for model type {model_type!r})"
    # PEFT's own test: a module's full name is the entry or ends with "." + it (q_proj, self_attn.q_proj)
    head = output_layer_name(model)
    if head and any(t == head or str(t).endswith("." + head) for t in targets):
        raise ConfigError(f"methods.lora.target_modules: {head!r} is the model's output layer, which TRL's SFTTrainer "
                          "does not adapt (it computes the loss from that layer's weight directly, so the adapter "
                          f"would never train); its linear modules are {linear_module_names(model)} (list some of "
                          "them, or use 'all-linear', which leaves the output layer out)")
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"methods.lora.target_modules: {missing}{source} not found in "
                          f"{type(model).__name__}; its linear modules are {linear_module_names(model)} "
                          "(list some of them, or use 'all-linear')")
    return list(targets)
