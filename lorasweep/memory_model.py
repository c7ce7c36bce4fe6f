"""Predicted training memory from first principles, shown beside the measured figure.

Assumptions (stated in the report):
- weights at their storage dtype: fp32 = 4 bytes; a 4-bit layer 0.5 byte per weight plus one fp32
  absmax per 64-weight block (0.0625 byte; double quantization makes it smaller);
- gradients and AdamW's two moments for trainable parameters only, in fp32: 4 + 8 bytes each;
- activations per decoder layer, after Korthikanti et al. (2022): s*b*h*34 bytes for 16-bit activations,
  doubled for fp32 (CPU) runs; s = the longest padded batch actually fed. The attention matrices
  (scores, probabilities, dropout mask: 5*a*s^2*b more) are kept for the backward pass only by eager
  attention: PyTorch's SDPA (transformers' default) runs fused kernels that keep none (flash or
  memory-efficient on CUDA, the flash kernel on the CPU, masks included);
- logits: the fp32 logits, their log-softmax and its gradient, 3 * b * s * vocab * 4 bytes;
- no allocator caching, fragmentation or framework workspace: the error shows how much that is.
"""

from __future__ import annotations

BLOCK = 64


def weight_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            n = 1
            for d in qs.shape:
                n *= d
            total += n // 2 + 4 * ((n + BLOCK - 1) // BLOCK)
        else:
            total += p.numel() * p.element_size()
    return total


def stores_attention_matrices(model) -> bool:
    """Whether the model's attention keeps its s x s matrices for the backward pass (eager attention)."""
    return getattr(model.config, "_attn_implementation", None) in (None, "eager")


def predict(model, trainable_params: int, batch_size: int, seq_len: int, precision: str) -> dict:
    """Predicted bytes by component; ``predicted_train_increment_bytes`` excludes the weights loaded before."""
    cfg = model.config
    h = cfg.hidden_size
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    vocab = cfg.vocab_size
    b, s = batch_size, seq_len
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    per_layer = s * b * h * (34 + (5 * heads * s / h if stores_attention_matrices(model) else 0)) * (act_bytes / 2)
    activations = int(layers * per_layer + 3 * b * s * vocab * 4)
    weights = weight_bytes(model)
    grads = 4 * trainable_params
    optimizer = 8 * trainable_params
    return {
        "predicted_weights_bytes": weights,
        "predicted_gradients_bytes": grads,
        "predicted_optimizer_bytes": optimizer,
        "predicted_activations_bytes": activations,
        "predicted_peak_bytes": weights + grads + optimizer + activations,
        "predicted_train_increment_bytes": grads + optimizer + activations,
        "predicted_for_seq_len": s,
    }


def compare(pred: dict, measured: dict) -> dict:
    """Error of the prediction against what was measured.

    CUDA: predicted peak vs ``peak_cuda_allocated_bytes``. CPU: predicted increment over the load footprint
    vs ``peak_rss_bytes - rss_at_load_bytes`` (the process's own baseline is not modelled).
    """
    if measured.get("peak_cuda_allocated_bytes"):
        target, value = "peak_cuda_allocated_bytes", pred["predicted_peak_bytes"]
        actual = measured["peak_cuda_allocated_bytes"]
    elif measured.get("peak_rss_bytes") and measured.get("rss_at_load_bytes"):
        target, value = "peak_rss_bytes - rss_at_load_bytes", pred["predicted_train_increment_bytes"]
        actual = measured["peak_rss_bytes"] - measured["rss_at_load_bytes"]
    else:
        return {"memory_model_compared_to": None, "memory_model_error_pct": None}
    return {"memory_model_compared_to": target, "measured_compared_bytes": actual,
            "memory_model_error_pct": 100.0 * (value - actual) / actual if actual else None}
