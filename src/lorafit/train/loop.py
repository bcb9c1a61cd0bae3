"""The training loop, readable top to bottom: schedule -> accumulate -> clip -> step -> log -> validate.

Gradient accumulation divides every micro-batch's summed loss by the number of target tokens in
the *whole* accumulated batch (across ranks), so k micro-batches give the same gradient as one
batch k times larger, whatever the padding or masking (pitfall 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from lorafit.config import TrainSection
from lorafit.evaluate.perplexity import LossResult
from lorafit.train import faults
from lorafit.train.batches import BlockStream
from lorafit.train.loss import target_count
from lorafit.train.schedule import learning_rate, warmup_steps_for


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    best_valid_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    interrupted_by: str | None = None
    best_trainable: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])


def train_loop(
    accelerator,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    blocks: torch.Tensor,
    train: TrainSection,
    autocast: Callable,
    validate: Callable[[], LossResult],
    log_metrics: Callable[[dict], None],
    on_step_end: Callable[[LoopState, dict], None] = lambda state, position: None,
    progress=None,
    state: LoopState | None = None,
    position: dict | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> LoopState:
    """Train until train.max_steps (or early stopping); `state` and `position` resume a run."""
    state = state or LoopState()
    position = position or {"epoch": 0, "index": 0}
    stream = BlockStream(
        num_blocks=blocks.shape[0],
        batch_size=train.micro_batch_size,
        seed=train.seed,
        epoch=position["epoch"],
        index=position["index"],
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    warmup = warmup_steps_for(train.max_steps, train.warmup_steps)
    params = [p for p in objective.parameters() if p.requires_grad]
    task = (
        progress.add_task("train", total=train.max_steps, completed=state.step, loss=0.0, lr=0.0, tps=0.0)
        if progress
        else None
    )
    objective.train()

    while state.step < train.max_steps and not state.stopped_early:
        started = time.perf_counter()
        lr = learning_rate(state.step, train.max_steps, train.lr, warmup, train.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        micro_batches = [blocks[stream.next_indices()].to(accelerator.device) for _ in range(train.grad_accum)]
        targets = torch.tensor(sum(target_count(b) for b in micro_batches), device=accelerator.device)
        global_targets = accelerator.reduce(targets, reduction="sum") if accelerator.num_processes > 1 else targets
        # DDP averages gradients over ranks; multiplying by world size turns that into a sum.
        scale = accelerator.num_processes / global_targets.clamp(min=1).float()

        loss_sum = 0.0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = nullcontext() if last else accelerator.no_sync(objective)
            with sync, autocast():
                micro_loss = objective(batch, batch)
            accelerator.backward(micro_loss * scale)
            loss_sum += float(micro_loss.detach())

        grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm or math.inf)
        grad_norm = float(grad_norm)
        loss = loss_sum / max(int(targets), 1)
        if math.isfinite(grad_norm) and math.isfinite(loss):
            optimizer.step()
        else:
            state.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        step_tokens = sum(b.numel() for b in micro_batches) * accelerator.num_processes
        state.step += 1
        state.tokens_seen += step_tokens
        state.train_seconds += elapsed
        tokens_per_second = step_tokens / elapsed
        if state.step % train.log_every == 0 or state.step == train.max_steps:
            log_metrics(
                {
                    "step": state.step,
                    "loss": round(loss, 6),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6),
                    "tokens_per_second": round(tokens_per_second, 1),
                    "tokens": state.tokens_seen,
                    "epoch": stream.epoch,
                }
            )
        if progress is not None:
            progress.update(task, advance=1, loss=loss, lr=lr, tps=tokens_per_second)

        if train.eval_every and state.step % train.eval_every == 0 and state.step < train.max_steps:
            record_validation(state, objective, validate(), train.early_stopping_patience, log_metrics)
        on_step_end(state, stream.position())
        faults.after_step(state.step)
        if stop_requested() and state.step < train.max_steps and not state.stopped_early:
            state.interrupted_by = "signal"
            break
    return state


def record_validation(
    state: LoopState, model: torch.nn.Module, result: LossResult, patience: int, log_metrics: Callable[[dict], None]
) -> None:
    """Log a validation, keep the best weights, and decide on early stopping."""
    log_metrics({"step": state.step, "valid_loss": round(result.loss, 6), "valid_ppl": round(result.perplexity, 4)})
    if result.loss < state.best_valid_loss:
        state.best_valid_loss = result.loss
        state.best_step = state.step
        state.evals_without_improvement = 0
        state.best_trainable = trainable_state(model)
    else:
        state.evals_without_improvement += 1
        if patience and state.evals_without_improvement >= patience:
            state.stopped_early = True
