"""The training loop, readable top to bottom: schedule -> accumulate -> clip -> step -> log -> validate.

Gradient accumulation divides every micro-batch's summed loss by the number of target tokens in
the *whole* accumulated batch (across ranks), so k micro-batches give the same gradient as one
batch k times larger, whatever the padding or masking (a per-micro-batch mean would weight a
micro-batch with few answer tokens as much as a full one).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch.distributed.tensor import DTensor

from lorafit.compute.batches import BlockStream, BlockTensors
from lorafit.compute.loss import target_count
from lorafit.compute.perplexity import LossResult
from lorafit.config import TrainSection
from lorafit.errors import LorafitError
from lorafit.training import faults
from lorafit.training.progress import training_task
from lorafit.training.schedule import learning_rate, warmup_steps_for
from lorafit.training.sharded_state import full_trainable_state

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # non-finite loss or gradients: failures, counted towards a rollback
    overflow_steps: int = 0  # fp16 gradients beyond float16's range: skipped by the loss scaler, not failures
    best_valid_loss: float = math.inf
    best_task_metric: float = -math.inf  # with train.early_stopping_metric on eval.tasks: higher is better
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    interrupted_by: str | None = None
    rollback_lr_scale: float = 1.0  # the schedule's factor, lowered after each rollback from non-finite losses
    bad_in_row: int = 0
    micro_batch_size: int = 0  # 0 = train.micro_batch_size; halved after an out-of-memory error
    grad_accum: int = 0
    recent_losses: list[float] = field(default_factory=list)
    best_trainable: dict[str, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class LoopEngine:
    """What a step computes with: the (accelerate-prepared) objective and optimizer, the blocks."""

    accelerator: object
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    blocks: BlockTensors
    autocast: Callable
    scaler: torch.amp.GradScaler | None = None  # fp16's dynamic loss scale; None for bf16/fp32
    deepspeed: object | None = None  # the DeepSpeedEngine under DeepSpeed: it backpropagates, clips and steps
    fsdp: bool = False  # the objective is sharded by FSDP2 (training/fsdp.py)


@dataclass
class LoopHooks:
    """What the loop calls out to: validation, the metrics log, the end of a step (checkpoints),
    whether a stop was asked for, and the progress bar."""

    validate: Callable[[], LossResult]
    log_metrics: Callable[[dict], None]
    # train.early_stopping_metric on eval.tasks: (name, value) now; None keeps the validation loss.
    task_metric: Callable[[], tuple[str, float]] | None = None
    on_step_end: Callable[[LoopState, dict], None] = lambda state, position: None
    # Called with the step's number once its gradients are complete (before clipping): the LoRA monitor.
    on_gradients: Callable[[int], None] = lambda step: None
    stop_requested: Callable[[], bool] = lambda: False
    progress: object = None


def train_loop(
    engine: LoopEngine,
    train: TrainSection,
    hooks: LoopHooks,
    state: LoopState | None = None,
    position: dict | None = None,
) -> LoopState:
    """Train until train.max_steps (or early stopping); `state` and `position` resume a run."""
    accelerator, objective, optimizer, blocks = engine.accelerator, engine.objective, engine.optimizer, engine.blocks
    log_metrics, progress = hooks.log_metrics, hooks.progress
    state = state or LoopState()
    state.micro_batch_size = state.micro_batch_size or train.micro_batch_size
    state.grad_accum = state.grad_accum or train.grad_accum
    position = position or {"epoch": 0, "index": 0}
    stream = BlockStream(
        num_blocks=len(blocks),
        batch_size=state.micro_batch_size,
        seed=train.seed,
        epoch=position["epoch"],
        index=position["index"],
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    warmup = warmup_steps_for(train.max_steps, train.warmup_steps)
    params = [p for p in objective.parameters() if p.requires_grad]
    task = training_task(progress, train.max_steps, state.step)
    objective.train()

    while state.step < train.max_steps and not state.stopped_early:
        started = time.perf_counter()
        schedule = learning_rate(state.step, train.max_steps, train.lr, warmup, train.min_lr_ratio)
        lr = schedule * state.rollback_lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_multiplier", 1.0)  # LoRA+: the B matrices' ratio

        step_start = stream.position()
        while True:
            try:
                loss_sum, targets, step_blocks = accumulate_gradients(engine, stream, state)
                break
            except OUT_OF_MEMORY:
                optimizer.zero_grad(set_to_none=True)
                if state.micro_batch_size == 1:
                    raise LorafitError(
                        f"Out of memory at step {state.step + 1} even with one block per micro-batch; lower "
                        "train.seq_len or set train.gradient_checkpointing: true."
                    ) from None
                # Same blocks per step, in smaller pieces: the gradient is unchanged (token-normalised).
                blocks_per_step = state.micro_batch_size * state.grad_accum
                state.micro_batch_size //= 2
                state.grad_accum = math.ceil(blocks_per_step / state.micro_batch_size)
                stream = replace(stream, batch_size=state.micro_batch_size, **step_start)
                log.warning(
                    "out of memory: continuing with micro-batch %d x %d accumulation steps",
                    state.micro_batch_size,
                    state.grad_accum,
                )
                log_metrics(
                    {
                        "step": state.step + 1,
                        "event": "out_of_memory",
                        "micro_batch_size": state.micro_batch_size,
                        "grad_accum": state.grad_accum,
                    }
                )

        loss = loss_sum / max(targets, 1)
        if engine.deepspeed is not None:
            outcome, grad_norm = deepspeed_step(engine.deepspeed, loss)
        else:
            if engine.scaler is not None:
                engine.scaler.unscale_(optimizer)  # clipping and the norm see the true gradients
            hooks.on_gradients(state.step + 1)
            grad_norm = clip_gradients(engine, params, train.max_grad_norm)
            outcome = optimizer_step(engine, loss, grad_norm)
        if outcome == "stepped":
            state.bad_in_row = 0
            warn_on_spike(state, loss, train.spike_factor, log_metrics)
        elif outcome == "overflow":
            state.overflow_steps += 1
            log_metrics({"step": state.step + 1, "event": "overflow", "loss_scale": loss_scale(engine)})
        else:
            state.skipped_steps += 1
            state.bad_in_row += 1
        optimizer.zero_grad(set_to_none=True)
        if state.bad_in_row >= train.max_bad_steps:
            raise UnstableTrainingError(step=state.step + 1, blocks=step_blocks)

        elapsed = time.perf_counter() - started
        step_tokens = len(step_blocks) * blocks.seq_len * accelerator.num_processes
        state.step += 1
        state.tokens_seen += step_tokens
        state.train_seconds += elapsed
        tokens_per_second = step_tokens / elapsed
        if state.step % train.log_every == 0 or state.step == train.max_steps:
            log_metrics(
                {
                    "step": state.step,
                    "loss": round(loss, 6) if math.isfinite(loss) else None,
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else None,
                    "tokens_per_second": round(tokens_per_second, 1),
                    "tokens": state.tokens_seen,
                    "epoch": stream.epoch,
                }
            )
        if progress is not None:
            progress.update(task, advance=1, loss=loss, lr=lr, tps=tokens_per_second)

        if train.eval_every and state.step % train.eval_every == 0 and state.step < train.max_steps:
            record_validation(
                state,
                accelerator.unwrap_model(objective),
                hooks.validate(),
                train.early_stopping_patience,
                log_metrics,
                hooks.task_metric() if hooks.task_metric else None,
            )
        hooks.on_step_end(state, stream.position())
        faults.after_step(state.step)
        if any_rank(accelerator, hooks.stop_requested()) and state.step < train.max_steps and not state.stopped_early:
            state.interrupted_by = "signal"
            break
    return state


# Below this loss scale fp16 gradients overflow for another reason than their size (inf or NaN
# from the data or the weights): such steps count as failures, as in bf16/fp32.
MIN_LOSS_SCALE = 1.0


def optimizer_step(engine: LoopEngine, loss: float, grad_norm: float) -> str:
    """Take the step, or not: 'stepped'; 'overflow' (fp16 only: finite loss, gradients beyond
    float16 — the scaler skips the step and halves its scale, as it is meant to); 'non-finite'."""
    scaler, optimizer = engine.scaler, engine.optimizer
    if scaler is None:
        if math.isfinite(grad_norm) and math.isfinite(loss):
            optimizer.step()
            return "stepped"
        return "non-finite"
    scale = scaler.get_scale()
    if math.isfinite(loss):
        scaler.step(optimizer)  # skips the update itself when the gradients hold inf/NaN
    scaler.update()
    if not math.isfinite(loss):
        return "non-finite"
    if math.isfinite(grad_norm):
        return "stepped"
    return "overflow" if scale > MIN_LOSS_SCALE else "non-finite"


def deepspeed_step(deepspeed, loss: float) -> tuple[str, float]:
    """DeepSpeed's own step at the accumulation boundary (clipping, the fp16 loss scale, skipping
    steps whose gradients overflow); returns the outcome as optimizer_step names it, and the norm."""
    deepspeed.step()
    norm = deepspeed.get_global_grad_norm()
    grad_norm = float(norm) if norm is not None else math.nan
    overflowed = bool(getattr(deepspeed.optimizer, "overflow", False))
    if not math.isfinite(loss):
        return "non-finite", grad_norm
    if overflowed:
        return ("overflow" if deepspeed.fp16_enabled() else "non-finite"), math.nan
    return "stepped", grad_norm


def loss_scale(engine: LoopEngine) -> float | None:
    if engine.deepspeed is not None:
        return float(getattr(engine.deepspeed.optimizer, "loss_scale", 0.0)) or None
    return engine.scaler.get_scale() if engine.scaler is not None else None


def any_rank(accelerator, flag: bool) -> bool:
    """True when `flag` is true on any process (a signal may reach one rank only)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum") > 0)


# CUDA's OOM error, and host RAM exhaustion where Python gets to see it.
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)
SPIKE_WINDOW = 50


class UnstableTrainingError(Exception):
    """Too many non-finite steps in a row; the caller rolls back or stops with a diagnosis."""

    def __init__(self, step: int, blocks: list[int]):
        super().__init__(f"non-finite loss or gradients up to step {step}")
        self.step = step
        self.blocks = blocks


def accumulate_gradients(engine: LoopEngine, stream: BlockStream, state: LoopState) -> tuple[float, int, list[int]]:
    """Forward/backward over one optimizer step's micro-batches; returns (loss sum, targets, block
    ids) — the loss and targets summed over every rank, so each logs the loss of the whole batch."""
    accelerator, objective, blocks, autocast = engine.accelerator, engine.objective, engine.blocks, engine.autocast
    scaler, deepspeed = engine.scaler, engine.deepspeed
    indices = [stream.next_indices() for _ in range(state.grad_accum)]
    micro_batches = [blocks.batch(i, accelerator.device) for i in indices]
    faults.before_backward(state.step + 1)
    targets = torch.tensor(sum(target_count(b["labels"]) for b in micro_batches), device=accelerator.device)
    global_targets = accelerator.reduce(targets, reduction="sum") if accelerator.num_processes > 1 else targets
    # DDP averages gradients over ranks; multiplying by world size turns that into a sum.
    scale = accelerator.num_processes / global_targets.clamp(min=1).float()
    scale = scale * faults.gradient_factor(state.step + 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = gradient_sync(engine, last)
        with sync, autocast():
            micro_loss = objective(**batch) * faults.loss_factor(state.step + 1)
        scaled = micro_loss * scale
        if deepspeed is not None:
            # The boundary is ours: DeepSpeed reduces the gradients there, and steps in deepspeed_step.
            # The loss is already normalised over the whole accumulated batch (no division by it).
            deepspeed.set_gradient_accumulation_boundary(last)
            deepspeed.backward(scaled, scale_wrt_gas=False)
        else:
            accelerator.backward(scaler.scale(scaled) if scaler is not None else scaled)
        loss_sum += micro_loss.detach().float()
    if accelerator.num_processes > 1:
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    return float(loss_sum), int(global_targets), [int(i) for batch in indices for i in batch]


def gradient_sync(engine: LoopEngine, last: bool):
    """Reduce the gradients across ranks only after the last micro-batch of a step."""
    if engine.fsdp:
        engine.objective.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else engine.accelerator.no_sync(engine.objective)


def clip_gradients(engine: LoopEngine, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (0: measure only); the gradients' global norm before clipping."""
    if engine.fsdp:
        # Sharded gradients: torch's clip reduces the norm across ranks; a DTensor comes back.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return float(engine.accelerator.clip_grad_norm_(params, max_norm or math.inf))


def warn_on_spike(state: LoopState, loss: float, factor: float, log_metrics: Callable[[dict], None]) -> None:
    """Log a warning when the loss jumps above `factor` x the running median of recent steps."""
    history = state.recent_losses
    if factor and len(history) >= 10:
        median = statistics.median(history)
        if loss > factor * median:
            log.warning("loss spike at step %d: %.4f > %.1f x median %.4f", state.step + 1, loss, factor, median)
            log_metrics(
                {"step": state.step + 1, "event": "loss_spike", "loss": round(loss, 6), "median": round(median, 6)}
            )
    history.append(loss)
    del history[:-SPIKE_WINDOW]


def record_validation(
    state: LoopState,
    model: torch.nn.Module,
    result: LossResult,
    patience: int,
    log_metrics: Callable[[dict], None],
    task_metric: tuple[str, float] | None = None,
) -> None:
    """Log a validation, keep the best weights, and decide on early stopping: by the validation
    loss, or by `task_metric` (name, value; higher is better) when the run stops on one."""
    record = {"step": state.step, "valid_loss": round(result.loss, 6), "valid_ppl": round(result.perplexity, 4)}
    if task_metric is not None:
        record[f"task_{task_metric[0]}"] = round(task_metric[1], 6)
    log_metrics(record)
    if task_metric is not None:
        improved = task_metric[1] > state.best_task_metric
        if improved:
            state.best_task_metric = task_metric[1]
    else:
        improved = result.loss < state.best_valid_loss
    if result.loss < state.best_valid_loss:
        state.best_valid_loss = result.loss
    if improved:
        state.best_step = state.step
        state.evals_without_improvement = 0
        state.best_trainable = full_trainable_state(model)  # every process: a collective under ZeRO/FSDP
    else:
        state.evals_without_improvement += 1
        if patience and state.evals_without_improvement >= patience:
            state.stopped_early = True
