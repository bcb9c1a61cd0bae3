"""LoRA health while a run trains: every train.monitor_every steps, the norms of each module's
weight change and gradients (model/lora_norms.py) into metrics.jsonl (`event: lora_norms`), and a
warning (`event: lora_warning`, and in the log) for a module that is not learning or explodes.

What is flagged, each once per module:
- `b_zero`: B is still exactly zero after PATIENCE checks. LoRA starts with B = 0, and A's
  gradient is Bᵀ·(...): a B that never moves leaves A without gradient, so the module learns nothing
  (a learning rate of zero for it, a frozen parameter, an optimizer that does not hold it).
- `vanishing`: the gradient of A or of B stays below VANISHING_SHARE of the median module's for
  PATIENCE checks in a row (relative, so it holds at any loss scale or model size).
- `exploding`: ‖ΔW‖ beyond ‖W‖ (the adapter outweighs the weight it adapts), or a norm that is not finite.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafit.model.lora_norms import ModuleNorms, aggregate, lora_modules, module_norms
from lorafit.training.sharded_state import PLAIN

PATIENCE = 3  # checks in a row
VANISHING_SHARE = 1e-4  # of the median module's gradient norm
EXPLODING_RATIO = 1.0  # ‖ΔW‖ / ‖W‖


@dataclass
class LoraMonitor:
    model: torch.nn.Module
    every: int
    log_metrics: Callable[[dict], None]
    warn: Callable[[str], None]
    weight_norms: dict[str, float | None] = field(default_factory=dict)
    zero_b_checks: dict[str, int] = field(default_factory=dict)
    low_grad_checks: dict[str, int] = field(default_factory=dict)
    flagged: set[tuple[str, str]] = field(default_factory=set)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int) -> list[ModuleNorms]:
        """Measure at `step` (gradients of the step present), log the aggregates and any warning."""
        norms = module_norms(self.model, self.weight_norms)
        if not norms:
            return norms
        self.log_metrics({"step": step, "event": "lora_norms", **aggregate(norms)})
        for kind, item, message in self._findings(norms):
            if (item.name, kind) in self.flagged:
                continue
            self.flagged.add((item.name, kind))
            self.warn(f"LoRA {item.name}: {message} (step {step})")
            self.log_metrics(
                {"step": step, "event": "lora_warning", "module": item.name, "kind": kind, "message": message}
            )
        return norms

    def _findings(self, norms: list[ModuleNorms]):
        grads = [g for m in norms for g in (m.grad_a, m.grad_b) if g is not None and math.isfinite(g) and g > 0]
        floor = VANISHING_SHARE * statistics.median(grads) if grads else None
        for item in norms:
            values = [item.delta, item.grad_a, item.grad_b]
            if any(v is not None and not math.isfinite(v) for v in values):
                yield "exploding", item, "a norm is not finite"
                continue
            if item.relative is not None and item.relative > EXPLODING_RATIO:
                yield "exploding", item, f"‖ΔW‖ is {item.relative:.2f} x ‖W‖: the adapter outweighs the weight"
            self.zero_b_checks[item.name] = self.zero_b_checks.get(item.name, 0) + 1 if item.delta == 0.0 else 0
            if self.zero_b_checks[item.name] >= PATIENCE:
                yield (
                    "b_zero",
                    item,
                    (
                        f"B is still zero after {self.zero_b_checks[item.name]} checks: the module learns nothing "
                        "(its learning rate is zero, or its weights are not trained)"
                    ),
                )
            low = floor is not None and any(g is not None and g < floor for g in (item.grad_a, item.grad_b))
            self.low_grad_checks[item.name] = self.low_grad_checks.get(item.name, 0) + 1 if low else 0
            if self.low_grad_checks[item.name] >= PATIENCE:
                yield (
                    "vanishing",
                    item,
                    (
                        f"gradients below {VANISHING_SHARE:g} x the median module's for "
                        f"{self.low_grad_checks[item.name]} checks (A {_shown(item.grad_a)}, B {_shown(item.grad_b)})"
                    ),
                )


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def make_monitor(
    model: torch.nn.Module, every: int, engine: str, log_metrics: Callable[[dict], None], warn: Callable[[str], None]
) -> tuple[LoraMonitor | None, str]:
    """The run's monitor, or None with the reason (printed in the header)."""
    if every <= 0:
        return None, "off (train.monitor_every: 0)"
    if engine != PLAIN:
        # ZeRO and FSDP hold the matrices and their gradients in parts on the processes.
        return None, f"off under {engine} (the LoRA matrices are partitioned)"
    if not lora_modules(model):
        return None, "off (no LoRA modules)"
    return LoraMonitor(model, every, log_metrics, warn), f"every {every} steps"
