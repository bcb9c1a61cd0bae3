"""How much each LoRA module has changed its weight, and how strongly it is being trained.

A module's weight change is ΔW = s·B·A (B: out x r, A: r x in). Its Frobenius norm comes from two
r x r products, never from the out x in matrix: ‖s·B·A‖² = s²·trace(Aᵀ Bᵀ B A) = s²·Σ (BᵀB) ⊙ (AAᵀ)
(AAᵀ is symmetric) — r²·(in + out) multiply-adds instead of r·in·out, and no out x in buffer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"\.layers?\.(\d+)\.")


@dataclass(frozen=True)
class ModuleNorms:
    """One adapted module: where it is, ‖ΔW‖, ‖W‖ of its base weight (None when the base is
    quantized) and the gradient norms of A and B (None without gradients)."""

    name: str
    layer: int | None
    kind: str  # the module's own name: q_proj, down_proj, ...
    delta: float
    weight: float | None
    grad_a: float | None
    grad_b: float | None

    @property
    def relative(self) -> float | None:
        """‖ΔW‖ / ‖W‖: the share of the base weight the adapter has changed."""
        return self.delta / self.weight if self.weight else None


def delta_norm(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> float:
    """‖scaling · B · A‖_F through the r x r products (A: r x in..., B: out x r...)."""
    a = lora_a.detach().reshape(lora_a.shape[0], -1).double()
    b = lora_b.detach().reshape(lora_b.shape[0], -1).double()
    squared = ((b.T @ b) * (a @ a.T)).sum().clamp(min=0.0)
    return abs(scaling) * math.sqrt(float(squared))


def _grad_norm(param: torch.Tensor) -> float | None:
    grad = param.grad
    return None if grad is None else float(grad.detach().double().norm())


def base_weight_norm(module: torch.nn.Module) -> float | None:
    """‖W‖ of the module's base weight; None for a quantized one (packed integers, not W)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = getattr(base, "weight", None)
    if weight is None or not weight.dtype.is_floating_point or hasattr(weight, "quant_state"):
        return None
    return float(weight.detach().double().norm())


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, module, adapter) for every PEFT LoRA module with a matrix pair for an active adapter."""
    found = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        active = getattr(module, "active_adapters", None) or list(lora_a.keys())
        found += [(name, module, adapter) for adapter in active if adapter in lora_a and adapter in module.lora_B]
    return found


def module_norms(model: torch.nn.Module, weight_norms: dict[str, float | None] | None = None) -> list[ModuleNorms]:
    """Norms of every LoRA module of `model`; `weight_norms` (name -> ‖W‖) caches the base's norms,
    which do not change while an adapter trains."""
    out = []
    for name, module, adapter in lora_modules(model):
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if weight_norms is not None and name in weight_norms:
            weight = weight_norms[name]
        else:
            weight = base_weight_norm(module)
            if weight_norms is not None:
                weight_norms[name] = weight
        layer = _LAYER.search(f".{name}.")
        out.append(
            ModuleNorms(
                name=name,
                layer=int(layer.group(1)) if layer else None,
                kind=name.rsplit(".", 1)[-1],
                delta=delta_norm(a, b, float(module.scaling[adapter])),
                weight=weight,
                grad_a=_grad_norm(a),
                grad_b=_grad_norm(b),
            )
        )
    return out


def _root_sum_square(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.sqrt(sum(v * v for v in present)) if present else None


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.6g}")


def aggregate(norms: list[ModuleNorms]) -> dict:
    """By module type and by layer: the root sum of squares of the members' norms (the norm of
    their changes stacked), and ‖ΔW‖ / ‖W‖ computed the same way on both sides."""

    def group(key) -> dict[str, dict]:
        groups: dict[str, list[ModuleNorms]] = {}
        for item in norms:
            groups.setdefault(key(item), []).append(item)
        result = {}
        for label, members in groups.items():
            delta = _root_sum_square([m.delta for m in members])
            weight = _root_sum_square([m.weight for m in members])
            result[label] = {
                "delta": _rounded(delta),
                "relative": _rounded(delta / weight if delta is not None and weight else None),
                "grad_a": _rounded(_root_sum_square([m.grad_a for m in members])),
                "grad_b": _rounded(_root_sum_square([m.grad_b for m in members])),
            }
        return result

    return {
        "by_type": group(lambda m: m.kind),
        "by_layer": group(lambda m: "-" if m.layer is None else str(m.layer)),
    }


def change_map(norms: list[ModuleNorms]) -> dict | None:
    """The report's heat map: ‖ΔW‖ / ‖W‖ per layer (rows) and module type (columns)."""
    placed = [m for m in norms if m.layer is not None and m.relative is not None]
    if not placed:
        return None
    layers = sorted({m.layer for m in placed})
    kinds = list(dict.fromkeys(m.kind for m in placed))
    cells = {(m.layer, m.kind): m.relative for m in placed}
    return {
        "layers": layers,
        "types": kinds,
        "relative": [[_rounded(cells.get((layer, kind))) for kind in kinds] for layer in layers],
    }
