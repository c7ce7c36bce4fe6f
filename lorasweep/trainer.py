"""lorasweep's SFTTrainer: TRL's training step, with every batch's tokens counted and every stretch of time
accounted for (training, evaluations, checkpoints), and without the per-step waits for the device that TRL and
the Trainer would add (see README, Speed).

``MeasuredSFTTrainer`` trains; the ``Recorder`` callback writes each log record as it happens, times training,
samples memory and writes what a resumed run needs beside each checkpoint. ``lorasweep.train.train_run`` puts
them together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTTrainer

from . import scoring
from .logs import WRITE_ERRNOS, write_room
from .memory import PeakMemory
from .provenance import MachineShare
from .resume import STATE_FILE, EvalOOM, atomic_write_json, logged_loss_sum

log = logging.getLogger("lorasweep.train")


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
    eval_oom_record = None  # called with an evaluation's EvalOOM before it is raised (train_run records it)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_counts = TokenCounts()  # train_run replaces it with one that holds a resumed run's counts
        self.pending_metrics: dict[str, list] = {}  # TRL's per-step metrics not yet read (compute_loss)
        self.drop_padding_mask = feeds_right_padded_batches(self)

    def training_step(self, model, inputs, num_items_in_batch=None):
        limit = os.environ.get("LORASWEEP_SIMULATE_OOM_ABOVE_BATCH")
        if limit and inputs["input_ids"].shape[0] > int(limit):  # tests: CUDA's error, raised where CUDA would
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
        self._wait_for_device()
        start = time.perf_counter()
        try:
            with self.memory.excluded() if self.memory else contextlib.nullcontext():
                examples = scoring.per_example_losses(self)
        except torch.OutOfMemoryError as e:  # not the training batch's doing: halving it would not help
            err = EvalOOM(
                f"out of memory while evaluating at step {self.state.global_step} (per-device eval batch "
                f"{self.args.per_device_eval_batch_size}{', beside the optimizer state' if self.state.global_step else ''}): "
                f"lower training.eval_batch_size. ({str(e).splitlines()[0] if str(e) else 'CUDA'})")
            if self.eval_oom_record is not None:
                self.eval_oom_record(err)
            raise err from e
        runtime = time.perf_counter() - start
        # the batches as they ran (longest first, _get_eval_sampler): the Trainer's figure is a mean over those
        size = self.args.per_device_eval_batch_size
        ran = [examples[i] for i in self._get_eval_sampler(self.eval_dataset)]
        batches = [ran[i:i + size] for i in range(0, len(ran), size)]
        metrics = {f"{metric_key_prefix}_loss": scoring.token_weighted(examples),
                   f"{metric_key_prefix}_loss_batch_mean":
                       sum(len(b) * scoring.token_weighted(b) for b in batches) / max(1, len(examples)),
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
        if self.args.device.type == "cuda":
            torch.cuda.synchronize(self.args.device)

    def _save_checkpoint(self, model, trial):
        self._wait_for_device()
        start = time.perf_counter()
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:  # torch.save's own error names neither the file nor the cause ("unexpected pos ...")
            if isinstance(e, torch.OutOfMemoryError):  # retried with half the batch (train_run)
                raise
            ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            err = CheckpointNotWritten(
                f"checkpoint {ckpt} could not be written ({type(e).__name__}: {e}); {write_room(ckpt.parent)}. "
                + ("" if isinstance(e, OSError) and e.errno not in WRITE_ERRNOS
                   else "A full disk or a file size limit? ")
                + "Make room, then run snakemake again: the run resumes from its last complete checkpoint (this one "
                "is discarded), or starts over without one; training.checkpoint_steps: 0 writes none")
            err.room_told = True
            raise err from e
        finally:
            self.checkpoint_time_s += time.perf_counter() - start

    def _issue_warnings_after_load(self, load_result):
        """The Trainer's warnings after it loads a checkpoint, less the missing keys of weights tied to one it
        loaded: a checkpoint leaves a tied weight out (OPT's lm_head.weight, the token embedding), and the
        Trainer, which loads it with ``load_state_dict``, called it missing on every resumed full fine-tuning run."""
        missing = untied_missing_keys(self.model, load_result.missing_keys)
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

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


def untied_missing_keys(model: torch.nn.Module, keys: list[str]) -> list[str]:
    """The keys of ``keys`` (missing from a state dict ``model`` loaded) that are not the name of a parameter tied to
    one that was loaded: one parameter under two names (``lm_head.weight`` and ``model.decoder.embed_tokens.weight``
    of a tied OPT) is loaded under either."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name not in keys}
    return [k for k in keys if k not in params or id(params[k]) not in loaded]


class CheckpointNotWritten(RuntimeError):
    """Saving a checkpoint failed (a full disk, a file size limit): the message names it and what is left to write."""


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
        self.save_due = False  # checkpoint_steps came, and no logging step since
        self.gpu_peers = gpu_peers  # GpuSlot.peers: other training jobs on this job's GPU, or None
        self.peers_max = (resume or {}).get("gpu_jobs_beside_max")
        self._peers_at = None
        self.counts = counts
        self.memory = memory
        self.t_begin = self.t_end = None
        self.mem_samples: list[dict] = []  # this segment's, one per step (per-step means: mem_sums)
        self.prior_mem_sums = (resume or {}).get("mem_sums") or {}  # earlier segments': {key: [sum, count]}
        self.eval_time_s = 0.0  # evaluation inside this segment of training
        self.prior = resume or {}  # what earlier segments (before a crash) measured
        self.extra_state: dict = {}
        self.warned_diverged = False
        self.stop = None  # resume.StopOnSignal: a signal asks training to save a checkpoint and stop
        self.stopped_at: int | None = None  # the step it stopped at
        self.begin_step = 0  # the step this segment of training began at (a resumed run's checkpoint)

    def sample_peers(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.gpu_peers is None or (not force and self._peers_at and now - self._peers_at < self.PEERS_EVERY_S):
            return
        self._peers_at = now
        n = self.gpu_peers()
        if n is not None:
            self.peers_max = max(n, self.peers_max or 0)

    def mem_sums(self) -> dict:
        """Per memory figure, [sum, count] of the per-step samples of every segment so far (earlier segments'
        up to their last checkpoint): a resumed run's means cover all its steps, not its last segment's."""
        out = {k: list(v) for k, v in self.prior_mem_sums.items()}
        for sample in self.mem_samples:
            for k, v in sample.items():
                if v is not None:
                    acc = out.setdefault(k, [0, 0])
                    acc[0] += v
                    acc[1] += 1
        return out

    def elapsed(self) -> float:
        return self.prior.get("elapsed_s", 0.0) + (time.perf_counter() - self.t_begin if self.t_begin else 0.0)

    def totals(self, at: float | None = None) -> dict:
        """The run's times in seconds, earlier segments' included, up to ``at`` (a ``time.perf_counter()``
        reading; the end of training by default): ``elapsed_s`` since training began, and within it
        ``eval_time_s`` (evaluations), ``checkpoint_time_s`` (writing checkpoints) and ``train_time_s`` (the rest:
        training alone). A checkpoint saves them; the metrics report them."""
        segment = (self.t_end if at is None else at) - self.t_begin
        evals, checkpoints = self.eval_time_s, self.checkpoint_time_s
        return {"train_time_s": self.prior.get("train_time_s", 0.0) + segment - evals - checkpoints,
                "eval_time_s": self.prior.get("eval_time_s", 0.0) + evals,
                "checkpoint_time_s": self.prior.get("checkpoint_time_s", 0.0) + checkpoints,
                "elapsed_s": self.prior.get("elapsed_s", 0.0) + segment}

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
        times = self.totals(start)
        mem = self.memory.read(keep_running=True)
        prior_peaks = self.prior.get("peaks", {})  # earlier segments' (their evaluations' too)
        history = [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]
        # the Trainer's files as written: a file cut short since (a full disk, a copy, a crash before the page
        # cache reached the disk) makes the checkpoint incomplete, not a resume that fails on every attempt
        files = {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*"))
                 if f.is_file() and not f.name.startswith(STATE_FILE)}
        atomic_write_json(ckpt / STATE_FILE, {
            **self.extra_state, "step": state.global_step, "counts": self.counts.read(), "files": files,
            **times,  # train_time_s, eval_time_s, checkpoint_time_s, elapsed_s
            # the training loss summed over steps 1..step (every checkpoint step is a logging step)
            "train_loss_sum": logged_loss_sum(history, state.global_step),
            "machine": self.machine.totals() if self.machine else None,
            "segments": self.prior.get("segments", 0) + 1,
            "gpu_jobs_beside_max": self.peers_max,
            "mem_sums": self.mem_sums(),
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
        self.begin_step = state.global_step  # the ETA counts this segment's steps
        self.sample_peers(force=True)

    def on_step_end(self, args, state, control, **kw):
        self.mem_samples.append(self.memory.current())
        self.sample_peers()
        if (self.stop is not None and self.stop.requested and state.global_step < state.max_steps
                and control.should_log):
            # a signal (preemption, Ctrl-C): at the next logging step (the resumed run's train loss and loss curve
            # are then the uninterrupted run's: an extra log would split a logged mean in two), save whatever the
            # interval, and stop; until then, steps go on as usual, periodic checkpoints included
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        elif state.global_step >= state.max_steps:
            # no checkpoint of the finished run (the Trainer writes one at the end): resuming from it would
            # train one step more, and the trained model is saved anyway; a crash after training resumes
            # from the last periodic checkpoint instead
            control.should_save = False
        else:
            # every checkpoint_steps (the Trainer's trigger), a checkpoint is due; it is saved at the first logging
            # step from there: the logged losses then cover every step up to it, as a resumed run needs, and the
            # loss curve is the same whatever checkpoint_steps (an operational setting) and the interval below
            self.save_due = self.save_due or control.should_save
            control.should_save = False
            if self.save_due and control.should_log:
                self.save_due = False
                # not too soon after the last one (training.checkpoint_min_interval_s): else skipped
                control.should_save = time.perf_counter() - self.last_save >= self.min_save_interval_s

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
        if "loss" in logs and not finite_log(logs) and not self.warned_diverged:
            self.warned_diverged = True
            log.warning("training loss %s, gradient norm %s at step %d: the run has diverged (learning rate %s "
                        "too high for this model?); it trains on and its metrics are written as measured",
                        logs["loss"], logs.get("grad_norm"), state.global_step, args.learning_rate)
        if "loss" in logs:
            log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.2e%s", state.global_step, state.max_steps,
                     state.epoch or 0, logs["loss"], logs.get("learning_rate", float("nan")), self.eta(state))
        elif "eval_loss" in logs and state.max_steps:  # the untrained model's: train.py logs it
            log.info("step %d/%d  eval_loss %.4f  (%.1fs)", state.global_step, state.max_steps,
                     logs["eval_loss"], logs.get("eval_runtime", 0))

    def eta(self, state) -> str:
        """``  eta 1h05m``: the steps left at this segment's pace so far (its evaluations and checkpoints included)."""
        done, left = state.global_step - self.begin_step, state.max_steps - state.global_step
        if not self.t_begin or done <= 0 or left <= 0:
            return ""
        s = round((time.perf_counter() - self.t_begin) / done * left)
        return "  eta " + (f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else
                           f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def finite_log(record: dict) -> bool:
    """A training log record whose loss and gradient norm (when logged) are finite numbers."""
    return all(math.isfinite(record[k]) for k in ("loss", "grad_norm") if record.get(k) is not None)
