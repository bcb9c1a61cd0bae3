"""LoRA through PEFT: the config keys mapped onto `LoraConfig`, checked against the model first,
and the trainable-parameter report."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import LoraSection, is_module_pattern
from lorafit.errors import ConfigError

# Inits that move part of the base weights into the adapter: the in-memory base is changed, and the
# saved adapter is converted back to plain LoRA against the untouched base (PEFT's conversion).
BASE_CHANGING_INITS = ("pissa", "olora")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers that LoRA can adapt (e.g. q_proj, down_proj)."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})


def _matches_suffix(key: str, names: Iterable[str]) -> bool:
    """PEFT's rule for rank_pattern/alpha_pattern keys (the key matches the end of a module name),
    by PEFT's own function: it returns the key that matched, else the name itself."""
    from peft.utils.other import get_pattern_key

    return any(get_pattern_key([key], name) == key for name in names)


def check_lora_against_model(model: torch.nn.Module, lora: LoraSection) -> None:
    """Refuse, before any work, names and patterns that match nothing (listing what exists)."""
    existing = linear_module_names(model)
    module_names = [name for name, _ in model.named_modules() if name]
    listing = f"linear layers here: {', '.join(existing)} (or use 'all-linear')"
    targets = lora.target_modules
    if is_module_pattern(targets):
        try:
            compiled = re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"lora.target_modules: {targets!r} is not a valid regular expression ({exc}).") from None
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if not any(compiled.fullmatch(name) for name in linear):
            raise ConfigError(
                f"lora.target_modules: the pattern {targets!r} matches no linear layer's full name "
                f"(e.g. {linear[0]}); {listing}."
            )
    elif targets != "all-linear":
        missing = [t for t in targets if t not in existing]
        if missing:
            raise ConfigError(f"lora.target_modules: {missing} match no layer of this model; {listing}.")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(lora, key):
            if not _matches_suffix(pattern, module_names):
                raise ConfigError(f"lora.{key}: {pattern!r} matches no module of this model; {listing}.")
    short_names = {name.rsplit(".", 1)[-1] for name in module_names}
    missing = [m for m in lora.modules_to_save if m not in short_names]
    if missing:
        raise ConfigError(
            f"lora.modules_to_save: {missing} are not modules of this model (e.g. embed_tokens, lm_head, "
            f"{existing[0]})."
        )


def peft_lora_config(lora: LoraSection):
    from peft import EvaConfig, LoraConfig

    init: bool | str = True if lora.init == "default" else lora.init
    if lora.init == "loftq":
        init = True  # LoftQ replaces the weights after wrapping (replace_lora_weights_loftq)
    targets = lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if targets == "all-linear" or is_module_pattern(targets) else list(targets),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=init,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        modules_to_save=list(lora.modules_to_save) or None,
        bias=lora.bias,
        eva_config=EvaConfig() if lora.init == "eva" else None,
        task_type="CAUSAL_LM",
    )


def apply_lora(
    model: torch.nn.Module,
    lora: LoraSection,
    under_autocast: bool = False,
    init_batches: Iterable[dict] | None = None,
    weights_path: str | None = None,
):
    """Wrap `model` in a PEFT LoRA model; adapter weights are kept in fp32 even on a bf16 base.

    `under_autocast`: the model always runs inside bf16 autocast, so PEFT's cast of every LoRA
    input to fp32 is only a copy (autocast casts it back) that is also kept for backward:
    switching it off saves ~2 GB and ~10% time for all-linear LoRA at 4 x 512 tokens.
    `init_batches`: training batches for the data-driven EVA init. `weights_path`: the base's
    safetensors folder, for LoftQ on a 4-bit base.
    """
    from peft import get_peft_model

    check_lora_against_model(model, lora)
    peft_model = get_peft_model(
        model, peft_lora_config(lora), autocast_adapter_dtype=True, low_cpu_mem_usage=lora.init == "eva"
    )
    if lora.init == "eva":
        from peft import initialize_lora_eva_weights

        if init_batches is None:
            raise ValueError("the EVA init needs training batches")
        with torch.no_grad():
            initialize_lora_eva_weights(peft_model, dataloader=list(init_batches), show_progress_bar=False)
    if lora.init == "loftq":
        from peft import replace_lora_weights_loftq

        replace_lora_weights_loftq(peft_model, model_path=weights_path)
    if under_autocast:
        for module in peft_model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return peft_model


def start_from_adapter(peft_model: torch.nn.Module, folder: str) -> None:
    """Load a trained adapter's weights into the fresh LoRA of `peft_model` (lora.init_from: a
    second stage after continued pretraining, or more training of an adapter). Its modules and
    ranks must be this run's: a mismatch is refused with the difference named."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    root = Path(folder).expanduser()
    candidates = [root / "adapter_model.safetensors", root / "adapter" / "adapter_model.safetensors"]
    weights_file = next((path for path in candidates if path.is_file()), None)
    if weights_file is None:
        raise ConfigError(
            f"lora.init_from: {folder} holds no adapter_model.safetensors (nor adapter/ with one); "
            "name a run folder or a PEFT adapter folder."
        )
    weights = load_file(str(weights_file))
    own = {name for name, _ in peft_model.named_parameters() if "lora_" in name}
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as exc:  # a shape mismatch: another rank, or another base
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise ConfigError(
            f"lora.init_from: {weights_file} does not fit this run's LoRA ({first}); use its lora.r."
        ) from None
    missing = sorted(name for name in result.missing_keys if name in own)
    if result.unexpected_keys or missing:
        extra = (result.unexpected_keys or missing)[0]
        raise ConfigError(
            f"lora.init_from: {weights_file} and this run adapt different modules ({extra}); use its "
            "lora.target_modules."
        )


def changes_base_weights(lora: LoraSection) -> bool:
    return lora.init.startswith(BASE_CHANGING_INITS)


def optimizer_groups(model: torch.nn.Module, plus_ratio: float = 0.0) -> list[dict]:
    """Trainable parameters as AdamW groups. With LoRA+ (`plus_ratio` > 0) the B matrices form their
    own group whose learning rate is the schedule's times the ratio (the loop reads `lr_multiplier`)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not plus_ratio:
        return [{"params": [p for _, p in trainable], "lr_multiplier": 1.0}]
    b_matrices = [p for name, p in trainable if ".lora_B." in name]
    others = [p for name, p in trainable if ".lora_B." not in name]
    return [{"params": others, "lr_multiplier": 1.0}, {"params": b_matrices, "lr_multiplier": plus_ratio}]


# Parts of a PEFT parameter name that are wrappers, not the module the parameter belongs to.
_WRAPPER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
_WRAPPER_PARTS |= {"base_layer", "modules_to_save", "original_module", "default", "weight", "bias"}


def module_type(parameter_name: str) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight' -> 'q_proj'."""
    parts = [p for p in parameter_name.split(".") if p not in _WRAPPER_PARTS and not p.isdigit()]
    return parts[-1] if parts else parameter_name


@dataclass
class ParameterReport:
    trainable: int
    total: int
    by_module: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def as_dict(self) -> dict:
        return {
            "trainable": self.trainable,
            "total": self.total,
            "percent": round(self.percent, 4),
            "by_module": self.by_module,
        }


def parameter_report(model: torch.nn.Module) -> ParameterReport:
    """Trainable/total parameters, with trainable ones grouped by module type (q_proj, embed_tokens...)."""
    by_module: dict[str, int] = defaultdict(int)
    trainable = total = 0
    for name, param in model.named_parameters():
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 loads weights partitioned: their own size
        total += numel
        if param.requires_grad:
            trainable += numel
            by_module[module_type(name)] += numel
    return ParameterReport(trainable=trainable, total=total, by_module=dict(sorted(by_module.items())))
