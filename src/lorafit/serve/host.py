"""The served model: one base, its tokenizer, and named PEFT adapters loaded beside each other.

Each adapter keeps the chat template it was trained with (its lorafit.json) and the end-of-turn
ids that template implies, so a served answer is rendered and stopped exactly as in training.
Adapters are loaded at start-up or at run time; a run-time path must lie inside one of the
`--adapter-dir` folders, symlinks resolved, and an adapter that fails its checks leaves nothing
behind."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lorafit.adapters.load import TrainedLocation, attach_adapter, check_same_base, locate_trained, resolve_trained_base
from lorafit.compute.continuous import ADAPTER_BASE, SHARED_LANE
from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids, resolve_chat_template
from lorafit.errors import UsageError
from lorafit.model.device import compute_dtype, default_device, resolve_precision
from lorafit.model.load import load_causal_lm, load_tokenizer


@dataclass
class ServedModel:
    """One id clients name in `model`: the base (adapter None) or an adapter on it."""

    id: str
    adapter: str  # the PEFT adapter name, or ADAPTER_BASE
    template: ChatTemplate
    stop_ids: list[int]
    lane: str  # which batch lane its rows decode in (see compute.continuous)
    created: int
    path: Path | None = None


class ModelHost:
    """The base model and its adapters. `load`/`unload` change the model: call them only where no
    forward runs at the same time (the serving worker's thread, between steps)."""

    def __init__(
        self,
        adapters: dict[str, str],
        base: str | None = None,
        precision: str = "auto",
        adapter_dirs: list[Path] | None = None,
        allow_base_mismatch: bool = False,
    ):
        trained = {name: locate_trained(f"{name}={path}") for name, path in adapters.items()}
        full = [name for name, item in trained.items() if item.kind != "lora"]
        if full:
            raise UsageError(f"--adapter {full[0]}: a fully fine-tuned model, not an adapter; serve it with --base.")
        self.ref, self.fingerprint = resolve_trained_base(list(trained.values()), base, allow_base_mismatch)
        self.allow_base_mismatch = allow_base_mismatch
        self.adapter_dirs = [Path(d).expanduser().resolve() for d in adapter_dirs or []]
        for folder in self.adapter_dirs:
            if not folder.is_dir():
                raise UsageError(f"--adapter-dir {folder}: no such folder.")
        self.device = default_device()
        self.precision = resolve_precision(precision, self.device)
        self.tokenizer = load_tokenizer(self.ref)
        self.model = load_causal_lm(self.ref, compute_dtype(self.precision)).to(self.device)
        self.model.requires_grad_(False)
        self.model.eval()
        template = resolve_chat_template(self.tokenizer, "auto")
        self.base_id = self.ref.name
        self.served: dict[str, ServedModel] = {
            self.base_id: ServedModel(
                self.base_id, ADAPTER_BASE, template, end_of_turn_ids(self.tokenizer, template), SHARED_LANE, now()
            )
        }
        for name, item in trained.items():
            self._attach(name, item)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def _attach(self, name: str, item: TrainedLocation) -> ServedModel:
        if name in self.served:
            raise UsageError(f"a model named '{name}' is already served; choose another name.")
        from peft import PeftModel

        had_adapters = isinstance(self.model, PeftModel)
        try:
            self.model = attach_adapter(self.model, item.path, name)
            config = self.model.peft_config[name]
            if config.peft_type != "LORA":
                raise UsageError(f"{item.path}: a {config.peft_type} adapter; lorafit serves LoRA adapters.")
        except BaseException:
            self._forget(name, had_adapters)
            raise
        self.model.requires_grad_(False)
        self.model.eval()
        template = item.chat_template or self.served[self.base_id].template
        # PEFT mixes adapters in one batch except DoRA ones: each of those decodes in a lane of its own.
        lane = name if config.use_dora else SHARED_LANE
        served = ServedModel(name, name, template, end_of_turn_ids(self.tokenizer, template), lane, now(), item.path)
        self.served[name] = served
        return served

    def _forget(self, name: str, had_adapters: bool) -> None:
        """Undo a failed attach: whatever PEFT had injected for `name` is removed."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel) and had_adapters:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            return
        # The first adapter: PEFT injects its layers into the base model in place before loading
        # the weights, so a failed load can leave them behind. Put the original modules back.
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        self.model = strip_adapter_layers(model)

    def resolve_runtime_path(self, path_text: str) -> Path:
        """A run-time adapter path, resolved and confined to the --adapter-dir folders: relative
        paths are looked up in each; symlinks are followed before the check, so none leads out."""
        if not self.adapter_dirs:
            raise UsageError("adapters cannot be loaded at run time: the server was started without --adapter-dir.")
        given = Path(path_text).expanduser()
        candidates = [given] if given.is_absolute() else [folder / given for folder in self.adapter_dirs]
        for candidate in candidates:
            resolved = candidate.resolve()
            if not any(resolved.is_relative_to(folder) for folder in self.adapter_dirs):
                raise UsageError(f"path '{path_text}' lies outside the --adapter-dir folders.")
            if resolved.is_dir():
                return resolved
        raise UsageError(f"path '{path_text}': no such adapter folder in the --adapter-dir folders.")

    def load_runtime(self, name: str, path_text: str) -> ServedModel:
        folder = self.resolve_runtime_path(path_text)
        # Checked before a byte is read: no file in it (or in a run folder's adapter/) links out.
        for file in [*folder.iterdir(), *(folder / "adapter").glob("*")]:
            if not any(file.resolve().is_relative_to(d) for d in self.adapter_dirs):
                raise UsageError(f"path '{path_text}': {file.name} links outside the --adapter-dir folders.")
        item = locate_trained(f"{name}={folder}")
        if item.kind != "lora":
            raise UsageError(f"path '{path_text}' holds a fully fine-tuned model, not an adapter.")
        if not self.allow_base_mismatch:  # start-up adapters were checked by resolve_trained_base
            check_same_base(item, self.ref, self.fingerprint)
        return self._attach(name, item)

    def retire(self, name: str) -> ServedModel:
        """Stop offering adapter `name` (requests naming it get 404 from now); its weights stay
        until `drop` (when no running sequence uses them)."""
        served = self.served.get(name)
        if served is None or served.adapter == ADAPTER_BASE:
            raise UsageError(f"no adapter named '{name}' is loaded.")
        return self.served.pop(name)

    def drop(self, name: str) -> None:
        """Remove a retired adapter's weights from the model."""
        if len(self.model.peft_config) == 1:
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)


def strip_adapter_layers(model):
    """`model` with every PEFT layer or wrapper replaced by the module it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module.get_base_layer()
        setattr(parent, child, original)
    if "peft_config" in vars(model):  # PEFT's record of the injected adapter, kept on the base model
        del model.peft_config
    return model


def now() -> int:
    return int(time.time())
