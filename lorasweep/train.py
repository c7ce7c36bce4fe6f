"""One training run (full fine-tuning, LoRA or QLoRA) with TRL's SFTTrainer, measured honestly.

The recipe, top to bottom: resolve device and precision; load tokenizer and model (4-bit for QLoRA);
attach the LoRA adapter; build the SFTTrainer on prompt/completion data (loss on the response only);
evaluate the untrained model; reset the memory baseline; train; evaluate; save; write metrics last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError
from . import memory_model, speed
from .memory import PeakMemory, rss_bytes
from .provenance import MachineShare, git_state, hardware, hardware_label, package_versions

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
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    name = spec["model"]["name_or_path"]
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=spec["model"]["trust_remote_code"])
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint(name, "tokenizer", e)) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_hint(name: str, what: str, e: Exception) -> str:
    where = "local directory" if os.path.isdir(name) else "hub id (or a local path that does not exist)"
    return (f"could not load the {what} from model.name_or_path = {name!r}, read as a {where}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            "Without network access, download the model elsewhere (`hf download <id> --local-dir DIR`) and either set "
            "model.name_or_path to that local directory or set HF_HUB_OFFLINE=1 to use the local Hugging Face cache.")


def load_model(spec: dict, device: str, precision: str):
    """Model in fp32 (mixed precision comes from autocast); 4-bit nf4/fp4 base for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = spec["model"]["name_or_path"]
    # safetensors only: a pickle checkpoint (.bin) can run code when loaded
    kwargs = {"dtype": torch.float32, "trust_remote_code": spec["model"]["trust_remote_code"], "use_safetensors": True}
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

    from .presets import resolve_target_modules

    targets = resolve_target_modules(model, spec["lora"]["target_modules"])
    if spec["quantization"]:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec["training"]["gradient_checkpointing"])
    return get_peft_model(model, lora_config(spec, targets))


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
    trainer.model.save_pretrained(str(model_dir), path_initial_model_for_weight_conversion=str(initial))
    trainer.processing_class.save_pretrained(str(model_dir))


def adapted_modules(model) -> str:
    """The module names PEFT actually adapted, comma-separated (a preset or all-linear resolved)."""
    t = model.peft_config["default"].target_modules
    return t if isinstance(t, str) else ",".join(sorted(t))


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


class TokenCounts:
    """Tokens fed to training, batch by batch: all positions fed (``tokens_padded``), non-padding positions
    (``tokens_nonpad``: attention-mask ones; without a mask, as in padding-free batches, every position),
    positions with a label (``tokens_labelled``), examples (``samples``) and the longest batch (``max_seq_len``).

    Counting never makes the host wait for the device: what the batch's shape gives is added at once, the
    sums over masks and labels stay on the batch's device and are read (one wait, for all batches since the
    last read) only when :meth:`read` is called, at logging steps, checkpoints and the end. Reading them
    every step would stall a GPU's queue once per step.
    """

    KEYS = ("tokens_padded", "tokens_nonpad", "tokens_labelled", "samples", "max_seq_len")

    def __init__(self, start: dict | None = None):
        self._totals = {k: 0 for k in self.KEYS}
        self._totals.update({k: int(v) for k, v in (start or {}).items() if k in self.KEYS})
        self._pending = None  # on the device: [non-padding, labelled] since the last read

    def add(self, batch: dict) -> None:
        import torch

        ids = batch["input_ids"]
        fed = ids.numel()
        self._totals["tokens_padded"] += fed
        self._totals["samples"] += ids.shape[0]
        self._totals["max_seq_len"] = max(self._totals["max_seq_len"], ids.shape[-1])
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        real = mask.sum() if mask is not None and mask.dim() == 2 else ids.new_full((), fed)
        labelled = (labels != -100).sum() if labels is not None else real
        step = torch.stack([real.to(torch.int64), labelled.to(torch.int64)])
        self._pending = step if self._pending is None else self._pending + step

    def read(self) -> dict:
        """The counts so far, as ints."""
        if self._pending is not None:
            real, labelled = self._pending.tolist()
            self._pending = None
            self._totals["tokens_nonpad"] += real
            self._totals["tokens_labelled"] += labelled
        return dict(self._totals)


def without_padding_mask(batch: dict) -> dict:
    """A right-padded training batch for a causal LM without its attention mask, with the positions it implied
    (0, 1, 2, ... in every row) given instead.

    For the real tokens nothing changes: causal attention already keeps every token from all positions after
    it, right padding included, and their positions are 0..n-1 either way; the padding positions compute
    values no label reads (a test checks the losses are the same). What it saves: transformers reads the mask
    back from the device twice a step to see whether there is padding, and where there is, builds a 4-D mask
    that keeps SDPA off its causal kernels. TRL's loss needs either a mask or positions."""
    import torch

    ids = batch["input_ids"]
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    out["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return out


def feeds_right_padded_batches(trainer) -> bool:
    """Whether the trainer's batches are right-padded (TRL's language-modelling collator, not padding-free) for
    a model that takes positions: then training can leave the attention mask out (:func:`without_padding_mask`)."""
    import inspect

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = trainer.data_collator
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return (type(collator) is DataCollatorForLanguageModeling and not collator.padding_free
            and "position_ids" in inspect.signature(model.forward).parameters)


# lorasweep's training step keeps TRL's per-step metrics on the device (MeasuredSFTTrainer.compute_loss); False
# gives TRL's own compute_loss (the tests compare the two)
DEFER_LOSS_METRICS = True
# the Trainer's per-step bookkeeping without its walks over every module (MeasuredSFTTrainer.floating_point_ops,
# _clip_grad_norm); False gives the Trainer's own (the tests compare the two)
SKIP_MODULE_WALKS = True


def _trainer_class():
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
    from trl import SFTTrainer

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """transformers' length-grouped sampler draws its order from the global RNG, so a run resumed from a
        checkpoint mid-epoch replays a different order than the one it was interrupted in. Seeding each
        epoch's order with (seed, epoch) makes it the same whether the run was interrupted or not."""

        def __init__(self, *args, seed: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            g = torch.Generator()
            g.manual_seed(self.seed * 100_003 + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))

    class MeasuredSFTTrainer(SFTTrainer):
        """SFTTrainer that counts the tokens of every training batch it actually feeds."""

        last_eval_examples: list[dict] | None = None  # per-example losses of the latest evaluate()
        memory: PeakMemory | None = None  # evaluations are left out of its training peaks
        checkpoint_time_s = 0.0  # writing checkpoints (training.checkpoint_steps): not training, so not timed as it

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_counts = TokenCounts()  # train_run replaces it with one that holds a resumed run's counts
            self.pending_metrics: dict[str, list] = {}  # TRL's per-step metrics not yet read (compute_loss)
            self.drop_padding_mask = feeds_right_padded_batches(self)

        def training_step(self, model, inputs, num_items_in_batch=None):
            limit = os.environ.get("LORASWEEP_SIMULATE_OOM_ABOVE_BATCH")
            if limit and inputs["input_ids"].shape[0] > int(limit):  # tests: CUDA's error, raised where CUDA would
                import torch

                raise torch.OutOfMemoryError(f"simulated: CUDA out of memory (batch {inputs['input_ids'].shape[0]} "
                                             f"> LORASWEEP_SIMULATE_OOM_ABOVE_BATCH={limit})")
            self.token_counts.add(inputs)  # reads the mask (on the device) before it goes
            if self.drop_padding_mask and "attention_mask" in inputs:
                inputs = without_padding_mask(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """TRL's loss for a training step, with its per-step metrics (entropy, token accuracy) kept on the
            device until the next training log. TRL reads them back after every forward pass (three ``.item()``
            and two ``if tensor:``) and copies its token count to the GPU with a blocking copy: six waits
            for the GPU a step (benchmarks/results/h200-2026-11-26b.md). The loss
            and the logged values are the same (a test compares them with TRL's own path). Anything but TRL's
            plain NLL path on one process (a loss function or label smoothing, another loss type, a router
            loss, a batch with its mask, evaluation) is TRL's own."""
            if (not DEFER_LOSS_METRICS or not model.training or return_outputs or "attention_mask" in inputs
                    or "position_ids" not in inputs or self.compute_loss_func is not None
                    or self.label_smoother is not None or self.args.loss_type != "nll" or self.aux_loss_enabled
                    or self.accelerator.num_processes != 1):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch

            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)  # as TRL's compute_loss, trl 1.16.0
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
            with torch.no_grad():
                valid = outputs.label_mask.sum()
                zero = torch.zeros((), device=valid.device)
                self.pending_metrics.setdefault("entropy", []).append(
                    torch.where(valid > 0, outputs.entropy.detach().sum() / valid, zero))
                self.pending_metrics.setdefault("mean_token_accuracy", []).append(
                    torch.where(valid > 0, outputs.is_top1.sum() / valid, zero))
            self._total_train_tokens += inputs["position_ids"].size(1) // self._tp_size  # TRL's count, no read
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def floating_point_ops(self, inputs):
            """The Trainer's estimate for ``total_flos`` (6 x input positions x parameters without embeddings) with
            the parameters counted once: the Trainer counts them every step, a walk over every module (host time
            the GPU waits for: ~3 ms a step for a LoRA model of opt-350m's depth on a slow core); their number
            does not change while training."""
            main = getattr(self.model, "main_input_name", "input_ids")
            if not SKIP_MODULE_WALKS or main not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if getattr(self, "_flops_params", (None,))[0] is not self.model:
                self._flops_params = (self.model, self.model.num_parameters(exclude_embeddings=True))
            return 6 * inputs[main].numel() * self._flops_params[1]

        def _clip_grad_norm(self, model):
            """The Trainer's clipping (accelerate's ``clip_grad_norm_``) over the trainable parameters, listed
            once, on one device: frozen weights have no gradient, so the norm and the clipping are the same, but
            the Trainer lists ``model.parameters()`` every step, a walk over every module (LoRA: 994 modules of a
            24-layer OPT for 144 trainable tensors)."""
            from accelerate.utils import DistributedType

            if (not SKIP_MODULE_WALKS or self.accelerator.distributed_type != DistributedType.NO
                    or self._has_mixed_mesh_grads(model)):
                return super()._clip_grad_norm(model)
            if getattr(self, "_trainable", (None,))[0] is not model:
                self._trainable = (model, [p for p in model.parameters() if p.requires_grad])
            return self.accelerator.clip_grad_norm_(self._trainable[1], self.args.max_grad_norm)

        def log(self, logs, start_time=None):
            if self.pending_metrics and self.model.training:  # one read per metric at a training log
                import torch

                for key, values in self.pending_metrics.items():
                    self._metrics["train"][key].extend(torch.stack(values).tolist())
                self.pending_metrics = {}
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """One pass over the eval split scored per response token (every token counts once, whatever its
            batch): the measure of the metrics and of the paired intervals, so the loss curves end where the
            tables say. The Trainer's own figure, a mean of per-batch means that moves with the eval batch
            size, is kept as ``<prefix>_loss_batch_mean``."""
            if eval_dataset is not None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            import torch

            self._wait_for_device()
            start = time.perf_counter()
            try:
                with self.memory.excluded() if self.memory else contextlib.nullcontext():
                    examples = per_example_losses(self)
            except torch.OutOfMemoryError as e:  # not the training batch's doing: halving it would not help
                raise EvalOOM(
                    f"out of memory while evaluating at step {self.state.global_step} (per-device eval batch "
                    f"{self.args.per_device_eval_batch_size}{', beside the optimizer state' if self.state.global_step else ''}): "
                    f"lower training.eval_batch_size. ({str(e).splitlines()[0] if str(e) else 'CUDA'})") from e
            runtime = time.perf_counter() - start
            size = self.args.per_device_eval_batch_size
            batches = [examples[i:i + size] for i in range(0, len(examples), size)]
            metrics = {f"{metric_key_prefix}_loss": token_weighted(examples),
                       f"{metric_key_prefix}_loss_batch_mean":
                           sum(len(b) * token_weighted(b) for b in batches) / max(1, len(examples)),
                       f"{metric_key_prefix}_runtime": runtime,
                       f"{metric_key_prefix}_samples": len(examples)}
            self.last_eval_examples = examples
            # Trainer.log (-> Recorder.on_log -> log_history.jsonl), not SFTTrainer.log: that one would move
            # the training metrics TRL has gathered since the last training log into this record
            super(SFTTrainer, self).log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        def _wait_for_device(self):
            """Let the training kernels still queued on the GPU finish before an evaluation or a checkpoint
            starts its clock: they are training's time, not that stretch's."""
            import torch

            if self.args.device.type == "cuda":
                torch.cuda.synchronize(self.args.device)

        def _save_checkpoint(self, model, trial):
            self._wait_for_device()
            start = time.perf_counter()
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.checkpoint_time_s += time.perf_counter() - start

        def _get_eval_sampler(self, eval_dataset):
            # Longest first, ties in split order: the same order in every run (transformers would length-group
            # the eval set in an order drawn from the global RNG), little padding, and an eval batch too large
            # for the device fails in the untrained model's evaluation, not after training. per_example_losses
            # puts the results back in eval-split order, which the paired intervals rely on.
            if eval_dataset is None:
                return None
            lengths = [len(ids) for ids in eval_dataset["input_ids"]]
            return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths,
                                                          seed=self.args.data_seed or self.args.seed)
            return sampler

    return MeasuredSFTTrainer


def _callback_class():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Writes every log record to log_history.jsonl as it happens, prints progress, times training."""

        PEERS_EVERY_S = 10.0  # how often step ends ask how many other jobs share the GPU

        def __init__(self, history_path: Path, counts: TokenCounts, memory: PeakMemory, resume: dict | None = None,
                     gpu_peers=None, trainer=None, machine: MachineShare | None = None):
            self.history_path = history_path
            self.trainer = trainer  # its checkpoint_time_s: the Trainer's own checkpoint writing
            self.machine = machine  # saved with each checkpoint, so that a resumed run's share covers all of it
            self.state_save_s = 0.0  # this callback's part of checkpointing (lorasweep_state.json)
            self.min_save_interval_s = 0.0  # training.checkpoint_min_interval_s
            self.last_save = None  # when the last checkpoint (or training) began
            self.gpu_peers = gpu_peers  # GpuSlot.peers: other training jobs on this job's GPU, or None
            self.peers_max = (resume or {}).get("gpu_jobs_beside_max")
            self._peers_at = None
            self.counts = counts
            self.memory = memory
            self.t_begin = self.t_end = None
            self.mem_samples: list[dict] = []
            self.eval_time_s = 0.0  # evaluation inside this segment of training
            self.prior = resume or {}  # what earlier segments (before a crash) measured
            self.extra_state: dict = {}
            self.warned_diverged = False

        def sample_peers(self, force: bool = False) -> None:
            now = time.monotonic()
            if self.gpu_peers is None or (not force and self._peers_at and now - self._peers_at < self.PEERS_EVERY_S):
                return
            self._peers_at = now
            n = self.gpu_peers()
            if n is not None:
                self.peers_max = max(n, self.peers_max or 0)

        def elapsed(self) -> float:
            return self.prior.get("elapsed_s", 0.0) + (time.perf_counter() - self.t_begin if self.t_begin else 0.0)

        @property
        def checkpoint_time_s(self) -> float:
            """Time this segment spent writing checkpoints (the Trainer's files and lorasweep's state)."""
            return (self.trainer.checkpoint_time_s if self.trainer is not None else 0.0) + self.state_save_s

        def on_save(self, args, state, control, **kw):
            """Beside each Trainer checkpoint, what resuming from it needs to keep the metrics whole."""
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not ckpt.is_dir():
                return
            start = self.last_save = time.perf_counter()
            seg_train = start - self.t_begin - self.eval_time_s - self.checkpoint_time_s
            mem = self.memory.read(keep_running=True)
            prior_peaks = self.prior.get("peaks", {})  # earlier segments' (their evaluations' too)
            history = [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]
            _atomic_write_json(ckpt / STATE_FILE, {
                **self.extra_state, "step": state.global_step, "counts": self.counts.read(),
                "train_time_s": self.prior.get("train_time_s", 0.0) + seg_train,
                "eval_time_s": self.prior.get("eval_time_s", 0.0) + self.eval_time_s,
                "checkpoint_time_s": self.prior.get("checkpoint_time_s", 0.0) + self.checkpoint_time_s,
                # the training loss summed over steps 1..step (every checkpoint step is a logging step)
                "train_loss_sum": logged_loss_sum(history, state.global_step),
                "machine": self.machine.totals() if self.machine else None,
                "elapsed_s": self.elapsed(), "segments": self.prior.get("segments", 0) + 1,
                "gpu_jobs_beside_max": self.peers_max,
                "peaks": {k: max(mem.get(k) or 0, prior_peaks.get(k) or 0) for k in {*mem, *prior_peaks}
                          if k.startswith(("peak_", "eval_peak_")) and k != "peak_rss_method"},
                # the footprint these peaks sit on: a resumed process has its own (see rebase_peaks)
                "baseline": {k: v for k, v in mem.items() if k.endswith("_at_load_bytes")},
                "history": history,
            })
            # now complete: the ones before it have served (the Trainer's own rotation, save_total_limit,
            # would delete them before this state is written, leaving no complete checkpoint for a moment)
            for old in ckpt.parent.glob("checkpoint-*"):
                if old != ckpt and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            self.state_save_s += time.perf_counter() - start
            log.info("checkpoint at step %d saved (%s)", state.global_step, ckpt)

        def write(self, record: dict) -> None:
            with self.history_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = self.last_save = time.perf_counter()
            self.sample_peers(force=True)

        def on_step_end(self, args, state, control, **kw):
            self.mem_samples.append(self.memory.current())
            self.sample_peers()
            if state.global_step >= state.max_steps:
                # no checkpoint of the finished run (the Trainer writes one at the end): resuming from it would
                # train one step more, and the trained model is saved anyway; a crash after training resumes
                # from the last periodic checkpoint instead
                control.should_save = False
            elif control.should_save and time.perf_counter() - self.last_save < self.min_save_interval_s:
                control.should_save = False  # too soon after the last one (training.checkpoint_min_interval_s)
            elif control.should_save:
                control.should_log = True  # so that the logged losses cover every step up to the checkpoint

        def on_train_end(self, args, state, control, **kw):
            self.t_end = time.perf_counter()
            self.sample_peers(force=True)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            if "eval_runtime" in logs and self.t_begin:
                self.eval_time_s += logs["eval_runtime"]
            counts = self.counts.read()  # the one wait for the device's token sums since the last log
            if "num_tokens" in logs:  # TRL's count: positions per row when a batch comes without its mask
                logs["num_tokens"] = counts["tokens_nonpad"]
            record = {"step": state.global_step, "epoch": state.epoch, **logs,
                      "tokens_nonpad_seen": counts["tokens_nonpad"],
                      "tokens_padded_seen": counts["tokens_padded"],
                      "elapsed_s": self.elapsed()}
            self.write(record)
            if "loss" in logs and not _finite_log(logs) and not self.warned_diverged:
                self.warned_diverged = True
                log.warning("training loss %s, gradient norm %s at step %d: the run has diverged (learning rate %s "
                            "too high for this model?); it trains on and its metrics are written as measured",
                            logs["loss"], logs.get("grad_norm"), state.global_step, args.learning_rate)
            if "loss" in logs:
                log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.2e", state.global_step, state.max_steps,
                         state.epoch or 0, logs["loss"], logs.get("learning_rate", float("nan")))
            elif "eval_loss" in logs:
                log.info("step %d/%d  eval_loss %.4f  (%.1fs)", state.global_step, state.max_steps,
                         logs["eval_loss"], logs.get("eval_runtime", 0))

    return Recorder


def response_nll(logits, labels):
    """Next-token loss summed over each sequence's labelled (response) tokens, and their count.

    One sequence at a time: an fp32 copy of a whole batch's logits (and cross-entropy's log-softmax of
    it) would be 2 x 16 x 512 x 50,272 x 4 bytes = 3.3 GB for opt-350m at the default eval batch, more
    than training itself needs."""
    import torch
    import torch.nn.functional as F

    labels = labels[:, 1:]
    mask = labels != -100
    nll = torch.stack([F.cross_entropy(logits[i, :-1].float(), labels[i], ignore_index=-100, reduction="sum")
                       for i in range(logits.shape[0])])
    return nll, mask.sum(1)


def logged_loss_sum(history: list[dict], step: int) -> float | None:
    """The training loss summed over steps 1..``step`` from the logged records (each the mean over the steps
    since the one before); None when the last one logged is not at ``step``."""
    total, prev = 0.0, 0
    for h in history:
        if "loss" in h and h["step"] <= step:
            total += h["loss"] * (h["step"] - prev)
            prev = h["step"]
    return total if prev == step else None


def _finite_log(record: dict) -> bool:
    """A training log record whose loss and gradient norm (when logged) are finite numbers."""
    return all(math.isfinite(record[k]) for k in ("loss", "grad_norm") if record.get(k) is not None)


def perplexity(loss: float) -> float:
    """exp(loss); infinite where that overflows a float (a diverged run's loss), NaN for NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def token_weighted(examples: list[dict]) -> float:
    """Mean loss per response token over the eval split: every token counts once, whatever its batch."""
    return sum(e["loss_sum"] for e in examples) / max(1, sum(e["tokens"] for e in examples))


def per_example_losses(trainer) -> list[dict]:
    """Loss summed over each eval example's response tokens, and their count, in eval-split order.

    The report uses these for paired comparisons between runs (every run is scored on the same
    examples), so a difference in eval loss comes with a confidence interval instead of a guess.
    """
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    # the order the eval dataloader visits the examples in (lorasweep's: longest first; a plain Trainer's:
    # split order), so that every result lands at its example's place in the split
    sampler = trainer._get_eval_sampler(trainer.eval_dataset)
    if sampler is not None and not isinstance(sampler, (list, torch.utils.data.SequentialSampler)):
        raise TypeError(f"per-example losses need a fixed eval order, not a {type(sampler).__name__}")
    order = list(sampler if sampler is not None else range(len(trainer.eval_dataset)))
    out: list[dict | None] = [None] * len(order)
    seen = 0
    # The precision training computes in, for every evaluation: accelerate wraps the model's forward in
    # autocast only once training starts, so without this the untrained model was scored in fp32 and every
    # later evaluation in bf16 (~1e-3 apart per example on the tiny model).
    half = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    device_type = next(model.parameters()).device.type
    # The random state is put back afterwards: a dataloader draws its seed from the global generator, so
    # without this every evaluation would move the dropout masks of the training that follows, and how
    # often a run evaluates (training.evals) would change what it learns.
    devices = [torch.cuda.current_device()] if device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            torch.autocast(device_type, dtype=half, enabled=half is not None):
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            sums, counts = response_nll(logits, labels)
            for s, n in zip(sums.tolist(), counts.tolist()):
                out[order[seen]] = {"loss_sum": s, "tokens": int(n)}
                seen += 1
    model.train(was_training)
    if seen != len(order):
        raise RuntimeError(f"evaluation scored {seen} of {len(order)} eval examples")
    return out


STATE_FILE = "lorasweep_state.json"
OOM_FILE = "oom.json"


class TrainingOOM(RuntimeError):
    """Out of memory; the next attempt (Snakemake `retries`) halves the per-device batch."""


def resume_key(spec: dict, training: dict) -> str:
    """Checkpoints are resumed only by the same run with the same settings (batch included)."""
    import hashlib

    return hashlib.sha256(json.dumps({"spec": spec, "training": training}, sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]


def rebase_peaks(peaks: dict, then: dict | None, now: dict) -> dict:
    """An earlier segment's peaks moved onto this segment's footprint at load: each is what that segment added
    over its own footprint (``then``, its ``*_at_load_bytes``) plus this one's (``now``). A resumed process
    starts afresh, with its own runtime baseline; the raw peak of another process would mix the two and the
    run's ``peak - at_load`` figures would count the difference. Without a recorded baseline, unchanged."""
    if not then:
        return dict(peaks)
    base = {"rss": "rss_at_load_bytes", "cuda_allocated": "cuda_allocated_at_load_bytes",
            "cuda_reserved": "cuda_reserved_at_load_bytes"}
    out = {}
    for k, v in peaks.items():
        kind = k.removeprefix("eval_").removeprefix("peak_").removesuffix("_bytes")
        b = base.get(kind)
        known = b is not None and None not in (v, then.get(b), now.get(b))
        out[k] = v - then[b] + now[b] if known else v
    return out


def find_resumable(ckpt_root: Path, key: str) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint (lorasweep's state beside the Trainer's files) and that state, when it
    was written with the same settings. A newer checkpoint a crash left half-written is deleted and the
    complete one before it used; checkpoints of other settings are all deleted."""
    if not ckpt_root.is_dir():
        return None, None
    found = sorted((int(p.name.split("-")[1]), p) for p in ckpt_root.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, ckpt in reversed(found):
        state = _read_json(ckpt / STATE_FILE)
        if state is None:  # the Trainer's files without lorasweep's state: a crash while it was written
            log.info("discarding %s: written only in part (a crash while it was saved)", ckpt)
            shutil.rmtree(ckpt)
            continue
        if state.get("key") != key:
            log.info("discarding checkpoints in %s: written with other settings or data", ckpt_root)
            shutil.rmtree(ckpt_root)
            return None, None
        return ckpt, state
    return None, None


def halve_batch(training: dict, halvings: int) -> dict | None:
    """``training`` with its per-device batch cut ``halvings`` times by about half and gradient accumulation
    raised to keep the effective batch exactly: the batch becomes the largest divisor of ``batch_size`` at
    most ``batch_size / 2**halvings`` (8 -> 4 -> 2 -> 1; 6 -> 3 -> 1). None when that is below 1."""
    b = training["batch_size"]
    limit = b // 2**halvings
    if limit < 1:
        return None
    new = max(d for d in range(1, limit + 1) if b % d == 0)
    return {**training, "batch_size": new, "grad_accum": training["grad_accum"] * (b // new)}


def batch_after_oom(out_dir: Path, training: dict, key: str | None = None) -> tuple[dict, int]:
    """The settings for this attempt after the out-of-memory attempts recorded in ``oom.json`` (each halves
    the per-device batch, effective batch kept), and their number. A record made with other settings or
    data (``key``, the un-halved settings') is stale: deleted, and the configured batch used."""
    path = out_dir / OOM_FILE
    record = _read_json(path) if path.exists() else None
    if record is not None and key is not None and record.get("key") != key:
        log.info("an earlier out-of-memory record (%s) is for other settings or data: ignored", path)
        path.unlink(missing_ok=True)
        record = None
    halvings = int((record or {}).get("halvings") or 0)
    if not halvings:
        return training, 0
    halved = halve_batch(training, halvings)
    if halved is None:
        raise TrainingOOM(f"out of memory even at per-device batch 1 (after {halvings} halvings of "
                          f"training.batch_size = {training['batch_size']}): reduce training.max_length, enable "
                          "training.gradient_checkpointing, or use a GPU with more memory (delete "
                          f"{path} to try the configured batch again)")
    return halved, halvings


def record_oom(out_dir: Path, training: dict, halvings: int, error: Exception, key: str | None = None) -> TrainingOOM:
    """Record an out-of-memory attempt; ``training``: the configured (un-halved) settings, ``halvings``:
    this attempt's. The error says what the next attempt (Snakemake's retry) trains with."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    now = halve_batch(training, halvings) or training
    nxt = halve_batch(training, halvings + 1)
    _atomic_write_json(out_dir / OOM_FILE, {"halvings": halvings + 1, "last_error": first, "key": key,
                                           "failed_batch_size": now["batch_size"]})
    return TrainingOOM(f"out of memory at per-device batch {now['batch_size']} x accumulation {now['grad_accum']}. "
                       + (f"The next attempt (Snakemake retries the job) trains with batch {nxt['batch_size']} x "
                          f"accumulation {nxt['grad_accum']}, the same effective batch" if nxt
                          else "Batch 1 cannot be halved") + f". ({first})")


class EvalOOM(RuntimeError):
    """Out of memory in an evaluation: its batch (``training.eval_batch_size``), not the training batch."""


def total_steps(n_train: int, training: dict) -> int:
    if training["max_steps"] > 0:
        return training["max_steps"]
    per_epoch = math.ceil(math.ceil(n_train / training["batch_size"]) / training["grad_accum"])
    return max(1, math.ceil(per_epoch * training["epochs"]))


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


def _atomic_write_json(path: Path, obj: dict) -> None:
    """Write ``path`` whole or not at all, also across a power loss: the bytes reach the disk before the
    rename, and the rename before this returns."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename stands as it is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    """A JSON file's object; None when it is missing, empty or cut short (a crash while it was written)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


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
    training = {**spec["training"], **schema_operational(), **(operational or {})}
    device = resolve_device(training["device"])  # first: fail before any loading when CUDA is missing
    precision = resolve_precision(training["precision"], device)

    import torch
    from transformers import set_seed
    from trl import SFTConfig

    if device == "cuda":  # see config.schema.yaml: cuDNN attention re-plans for every new batch shape
        torch.backends.cuda.enable_cudnn_sdp(bool(training.get("cudnn_attention", False)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .data import fingerprint, load_splits

    data_sha = fingerprint(train_path, eval_path)

    def settings_key(t: dict) -> str:
        """The run, its settings (``t``), its data and how it computes (precision "auto" resolves per machine):
        an out-of-memory record or a checkpoint of anything else must not carry over into this run."""
        return resume_key(spec, {**{k: v for k, v in t.items() if k not in OPERATIONAL_KEYS},
                                 "data_sha256": data_sha, "resolved_device": device, "resolved_precision": precision})

    configured = training
    oom_key = settings_key(configured)
    training, oom_halvings = batch_after_oom(out_dir, configured, oom_key)
    if oom_halvings:
        log.info("an earlier attempt ran out of memory: per-device batch %d x accumulation %d (effective batch kept)",
                 training["batch_size"], training["grad_accum"])
    threads = training.get("threads") or threads
    if threads:  # never more threads than cores: oversubscription slows training and skews timings
        torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
    log.info("run %s: method %s, device %s, precision %s, %d torch threads", spec["run"], spec["method"],
             device, precision, torch.get_num_threads())

    train_ds, eval_ds = load_splits(train_path, eval_path)  # tokenized once per sweep: see load_splits

    set_seed(spec["seed"])
    tokenizer = load_tokenizer(spec)
    rss_before_load = rss_bytes()  # the process (Python, torch, data) before its model: what runs cannot differ in
    model = load_model(spec, device, precision)
    n4bit = count_4bit_layers(model)
    if spec["quantization"] and n4bit == 0:
        raise RuntimeError("QLoRA run loaded no 4-bit layers: bitsandbytes quantization did not take effect")
    initial_adapter = None
    if spec["lora"]:
        model = attach_lora(model, spec)
        initial_adapter = save_initial_adapter(model, spec, out_dir / "initial_adapter")
    params = count_parameters(model)
    log.info("parameters: %d trainable of %d (%.3f%%); 4-bit linear layers: %d", params["trainable_params"],
             params["total_params"], params["trainable_share_pct"], n4bit)

    steps = total_steps(len(train_ds), training)
    eval_steps = max(1, math.ceil(steps / training["evals"]))  # `evals` evaluations, the last at the end
    args = SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=steps,
        learning_rate=spec["learning_rate"],
        per_device_train_batch_size=training["batch_size"],
        per_device_eval_batch_size=training["eval_batch_size"],
        gradient_accumulation_steps=training["grad_accum"],
        lr_scheduler_type=training["lr_scheduler"],
        warmup_steps=training["warmup_ratio"],
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
    t_prep = time.perf_counter()
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               processing_class=tokenizer)
    data_prep_s = time.perf_counter() - t_prep
    if training.get("torch_compile_regional"):
        use_regional_compilation(trainer)
    # TRL drops the examples whose prompt alone fills max_length (no response token left to learn or score):
    # the steps of `epochs` and the evaluations count what is trained on and scored
    n_train, n_eval = len(trainer.train_dataset), len(trainer.eval_dataset)
    dropped = {"train_examples_dropped_too_long": len(train_ds) - n_train,
               "eval_examples_dropped_too_long": len(eval_ds) - n_eval}
    if any(dropped.values()):
        log.warning("%d training and %d eval example(s) left out: their prompt alone fills training.max_length = %d "
                    "tokens, leaving no response token (TRL drops them); a larger max_length keeps them",
                    *dropped.values(), training["max_length"])
        steps = total_steps(n_train, training)
        eval_steps = max(1, math.ceil(steps / training["evals"]))
        trainer.args.max_steps, trainer.args.eval_steps = steps, eval_steps
        trainer.args.logging_steps = min(training["logging_steps"], eval_steps)
    if trainer.drop_padding_mask:
        log.info("right-padded batches: training feeds positions instead of the attention mask (causal attention "
                 "already keeps tokens from the padding after them)")
    log.info("datasets ready in %.1fs (tokenization cached in %s after the first run of a sweep)", data_prep_s,
             Path(train_path).parent / "cache")
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
    recorder = _callback_class()(out_dir / "log_history.jsonl", counts, memory, resumed, gpu_peers=gpu_peers,
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
    log.info("untrained eval_loss %.4f; training %d steps (%d examples, batch %d x accumulation %d)",
             base_eval["eval_loss"], steps, n_train, training["batch_size"], training["grad_accum"])

    at_load = memory.reset()
    if resumed:  # earlier segments' peaks, on this process's footprint at load
        resumed["peaks"] = rebase_peaks(resumed.get("peaks", {}), resumed.get("baseline"), at_load)
    machine.start()
    try:
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except torch.OutOfMemoryError as e:
        raise record_oom(out_dir, configured, oom_halvings, e, oom_key) from e
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
    # this segment's wall time minus its evaluations and checkpoint writing, plus what earlier segments (before
    # a crash) measured
    prior = resumed or {}
    wall = recorder.t_end - recorder.t_begin + prior.get("elapsed_s", 0.0)
    eval_during = recorder.eval_time_s + prior.get("eval_time_s", 0.0)
    checkpoint_time = recorder.checkpoint_time_s + prior.get("checkpoint_time_s", 0.0)
    train_time = (recorder.t_end - recorder.t_begin - recorder.eval_time_s - recorder.checkpoint_time_s
                  + prior.get("train_time_s", 0.0))
    n_steps = trainer.state.global_step
    train_loss = result.training_loss  # the Trainer's: the mean over the steps of this segment
    if resumed:  # earlier segments' steps too
        before = resumed.get("train_loss_sum")
        if before is None:  # a checkpoint from before lorasweep saved it: from the logged losses if they reach it
            before = logged_loss_sum(resumed["history"], resumed["step"])
        train_loss = ((before + train_loss * (n_steps - resumed["step"])) / n_steps if before is not None
                      else float("nan"))
    last_eval = [h for h in history if "eval_loss" in h]
    if not last_eval or last_eval[-1].get("step") != trainer.state.global_step or not trainer.last_eval_examples:
        final_eval = trainer.evaluate()  # logged by the Recorder
    else:
        final_eval = last_eval[-1]
    losses = [h["loss"] for h in history if "loss" in h]
    final_examples = trainer.last_eval_examples  # the final evaluation's, of the trained model
    eval_loss = token_weighted(final_examples)
    _atomic_write_json(out_dir / "eval_losses.json", {
        "what": "per eval example (eval-split order): response-token loss sum and token count",
        "base": base_examples, "final": final_examples})

    model_dir = out_dir / "model"
    save_trained(trainer, model_dir, initial_adapter)
    if initial_adapter:
        shutil.rmtree(initial_adapter)  # the saved adapter is converted: the initial one has served its purpose
    saved = dir_bytes(model_dir)

    def mean_of(key):
        vals = [s[key] for s in recorder.mem_samples if s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    # fused_loss: SFTTrainer's loss is TRL's chunked LM head (no full logits), and the probe forwards through it
    try:
        predicted = memory_model.predict(trainer.model, params["trainable_params"], training["batch_size"],
                                         counts["max_seq_len"], precision, fused_loss=True,
                                         grad_accum=training["grad_accum"])
    except Exception as e:  # a model whose probe batches fail must not cost the trained run its metrics
        log.warning("memory model: no prediction for this run (%s: %s)", type(e).__name__, e)
        predicted = {}
    hw, versions, git = hardware(device), package_versions(), git_state(workflow_dir)
    metrics = {
        "run": spec["run"],
        "method": spec["method"],
        "rank": spec["rank"],
        "model": spec["model"]["name_or_path"],
        "device": device,
        "hardware": hardware_label(hw),
        "precision": precision,
        # hyperparameters of this run
        "learning_rate": spec["learning_rate"],
        "lora_alpha": spec["lora"]["alpha"] if spec["lora"] else None,
        "lora_dropout": spec["lora"]["dropout"] if spec["lora"] else None,
        "target_modules": adapted_modules(trainer.model) if spec["lora"] else None,
        "lora_init": spec["lora"].get("init", "default") if spec["lora"] else None,
        "use_rslora": spec["lora"].get("use_rslora", False) if spec["lora"] else None,
        "use_dora": spec["lora"].get("use_dora", False) if spec["lora"] else None,
        "quant_type": spec["quantization"]["quant_type"] if spec["quantization"] else None,
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
        # quality
        "train_loss": train_loss,
        "train_loss_last": losses[-1] if losses else None,
        # training logs (every logging_steps) whose loss or gradient norm was not finite: a diverged run
        "train_logs": len(losses),
        "train_nonfinite_logs": sum(1 for h in history if "loss" in h and not _finite_log(h)),
        # eval loss per response token of the eval split (token-weighted, as the paired comparisons); the
        # Trainer's way, a mean of per-batch means, depends on the eval batch size: kept beside it
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss),
        "base_eval_loss": token_weighted(base_examples),
        "eval_loss_batch_mean": final_eval.get("eval_loss_batch_mean"),
        "base_eval_loss_batch_mean": base_eval.get("eval_loss_batch_mean"),  # absent: resumed from an older checkpoint
        # speed (training only: the time of evaluations and of writing checkpoints is subtracted)
        "train_runtime_s": train_time,
        "train_wall_s": wall,
        "eval_time_during_train_s": eval_during,
        "checkpoint_time_s": checkpoint_time,
        "checkpoint_steps": training["checkpoint_steps"],
        "checkpoint_min_interval_s": training.get("checkpoint_min_interval_s"),
        "train_steps": n_steps,
        "train_samples": counts["samples"],
        "train_samples_per_s": counts["samples"] / train_time,
        "train_steps_per_s": n_steps / train_time,
        "train_tokens_nonpad": counts["tokens_nonpad"],
        "train_tokens_padded": counts["tokens_padded"],
        "train_tokens_labelled": counts["tokens_labelled"],
        "train_tokens_nonpad_per_s": counts["tokens_nonpad"] / train_time,
        "padding_share_pct": 100.0 * (1 - counts["tokens_nonpad"] / counts["tokens_padded"]),
        **({"mfu_pct": 100 * m} if (m := speed.mfu(params["total_params"], spec["method"] == "full",
                                                   counts["tokens_nonpad"] / train_time, hw.get("gpu_name")))
           else {}),
        # the best this GPU could do at this many tokens a step (lorasweep.speed.step_ceiling); none without one
        **speed.ceiling_metrics(params, spec["method"] == "full", counts["tokens_nonpad"] / max(n_steps, 1),
                                precision in ("bf16", "fp16"), hw.get("gpu_name"), training["grad_accum"]),
        **machine_share,
        # other training jobs on this run's GPU during training (training.jobs_per_gpu > 1); None: not shared
        # out by lorasweep (no GPU, one job per GPU, or a scheduler's own GPU)
        "gpu_jobs_beside_max": recorder.peers_max,
        # parameters and size
        **params,
        "quantized_4bit_layers": n4bit,
        "saved_model_bytes": saved,
        "saved_model_kind": "adapter" if spec["lora"] else "full model",
        # memory (CUDA fields are absent on the CPU)
        **{k: v for k, v in mem.items() if k != "peak_rss_method"},
        "rss_before_load_bytes": rss_before_load,
        **({"mean_cuda_allocated_bytes": mean_of("cuda_allocated_bytes"),
            "mean_cuda_reserved_bytes": mean_of("cuda_reserved_bytes")} if device == "cuda" else {}),
        "mean_rss_bytes": mean_of("rss_bytes"),
        "torch_version": versions["torch"],
        "transformers_version": versions["transformers"],
        "peft_version": versions["peft"],
        "trl_version": versions["trl"],
        "git_commit": git["git_commit"],
        "git_dirty": git["git_dirty"],
        "data_fingerprint_sha256": data_sha,
        **predicted,
        **memory_model.compare(predicted, mem),
        "memory_measured": ("CUDA peak allocated/reserved since the counters were reset after model load; "
                            if device == "cuda" else "") + f"peak RSS of the training process ({mem['peak_rss_method']}); "
                           "evaluations during training excluded (their own peaks: eval_peak_*)",
        # provenance
        "run_info": {"spec": spec, "seed": spec["seed"], "started_utc": started.isoformat(),
                     "finished_utc": datetime.now(timezone.utc).isoformat(),
                     "data_summary": json.loads(Path(data_summary_path).read_text()) if data_summary_path else None},
        "train_info": {"data_prep_s": data_prep_s, "total_steps_planned": steps, "eval_steps": eval_steps, "memory_at_load": at_load,
                       "train_examples": n_train, "eval_examples": n_eval, **dropped},
        "meta_info": {"packages": versions, **git, "hardware": hw},
    }
    _atomic_write_json(out_dir / "metrics.json", metrics)
    (out_dir / OOM_FILE).unlink(missing_ok=True)
    if not training["keep_checkpoints"] and (out_dir / "checkpoints").is_dir():
        shutil.rmtree(out_dir / "checkpoints")  # the finished model is saved; checkpoints only serve a resume
    log.info("done: train_loss %.4f  eval_loss %.4f  %.1fs  %.1f samples/s  peak RSS %.0f MiB", metrics["train_loss"],
             metrics["eval_loss"], train_time, metrics["train_samples_per_s"], (mem["peak_rss_bytes"] or 0) / 2**20)
    return metrics
