"""One base model, several adapters, switched without reloading (`lorafit chat`, `AdapterSession`).

    from lorafit.adapters.switch import AdapterSession
    session = AdapterSession({"law": "runs/law", "med": "runs/med"})
    session.use("law"); session.chat([{"role": "user", "content": "..."}])
    session.combine("both", {"law": 0.5, "med": 0.5}); session.save("both", "adapters/both")

Adapters are PEFT named adapters on one model: switching is a pointer change. Each adapter keeps
the chat template it was trained with (from its lorafit.json), so switching never changes the
prompt format under an adapter.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lorafit.adapters.load import TrainedLocation, attach_adapter, locate_trained, resolve_trained_base
from lorafit.artifacts import AdapterRecord, BaseModelRecord
from lorafit.compute.generate import generation_mode, greedy_generate
from lorafit.data.chat_template import ChatTemplate, end_of_turn_ids, render_prompt, resolve_chat_template
from lorafit.errors import UsageError
from lorafit.io import write_json_atomic
from lorafit.model.device import autocast_context, compute_dtype, default_device, resolve_precision
from lorafit.model.load import load_causal_lm, load_tokenizer
from lorafit.outputs import check_output_folder, write_folder_atomically

BASE = "base"
COMBINATIONS = ("cat", "linear", "svd")


class AdapterSession:
    """A base model with named adapters; `use` picks one ('base' = none)."""

    def __init__(
        self,
        adapters: dict[str, str],
        base: str | None = None,
        precision: str = "auto",
        allow_base_mismatch: bool = False,
    ):
        if not adapters:
            raise UsageError("Name at least one adapter: --adapter NAME=PATH.")
        trained = {name: locate_trained(f"{name}={path}") for name, path in adapters.items()}
        if BASE in trained:
            raise UsageError("'base' names the base model itself; give the adapter another name.")
        full = [name for name, item in trained.items() if item.kind != "lora"]
        if full:
            raise UsageError(f"{full[0]} is a fully fine-tuned model, not an adapter; open it with --base.")
        self.ref, _ = resolve_trained_base(list(trained.values()), base, allow_base_mismatch)
        self.device = default_device()
        self.precision = resolve_precision(precision, self.device)
        dtype = compute_dtype(self.precision)
        self.tokenizer = load_tokenizer(self.ref)
        model = load_causal_lm(self.ref, dtype).to(self.device)
        self.trained: dict[str, TrainedLocation] = trained
        self.combined: dict[str, dict] = {}  # adapter made by combine() -> its recipe
        self.templates: dict[str, ChatTemplate] = {BASE: resolve_chat_template(self.tokenizer, "auto")}
        for name, item in trained.items():
            model = attach_adapter(model, item.path, name)
            self.templates[name] = item.chat_template or self.templates[BASE]
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.active = next(iter(trained))
        self.use(self.active)

    @property
    def names(self) -> list[str]:
        return [BASE, *self.templates.keys() - {BASE}]

    def use(self, name: str) -> None:
        """Switch to adapter `name`, or to the bare base model with 'base'."""
        if name not in self.templates:
            raise UsageError(f"No adapter named '{name}'; loaded: {', '.join(self.names)}.")
        if name == BASE:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name)
            self.model.requires_grad_(False)  # set_adapter marks the active adapter trainable
        self.active = name

    def chat(self, messages: list[dict], max_new_tokens: int = 256) -> str:
        """The active model's greedy answer to a conversation, through its own chat template."""
        template = self.templates[self.active]
        prompt = render_prompt(self.tokenizer, template, messages)
        return self.complete(prompt, max_new_tokens, end_of_turn_ids(self.tokenizer, template))

    def complete(self, prompt: str, max_new_tokens: int = 256, stop_ids: list[int] | None = None) -> str:
        """The active model's greedy continuation of raw text (to EOS, or to one of `stop_ids`)."""
        with generation_mode(self.model):
            return greedy_generate(
                self.model,
                self.tokenizer,
                [prompt],
                max_new_tokens,
                self.device,
                lambda: autocast_context(self.precision, self.device),
                stop_ids=stop_ids,
            )[0]

    def combine(self, name: str, weights: dict[str, float], combination_type: str = "cat") -> None:
        """A new adapter `name` = the weighted combination of loaded adapters (PEFT's
        add_weighted_adapter). 'cat' (default) is exact: its weight change is the weighted sum of
        theirs; 'svd' approximates that at the largest input rank; 'linear' mixes the A and B
        matrices (cheap, rough)."""
        if name in self.templates:
            raise UsageError(f"An adapter named '{name}' is already loaded; choose another name.")
        unknown = [a for a in weights if a not in self.templates or a == BASE]
        if unknown:
            raise UsageError(f"Cannot combine '{unknown[0]}': loaded adapters are {', '.join(self.names[1:])}.")
        if combination_type not in COMBINATIONS:
            raise UsageError(f"combination {combination_type!r}: use one of {', '.join(COMBINATIONS)}.")
        dora = [a for a in weights if self.model.peft_config[a].use_dora]
        if dora:
            raise UsageError(f"{dora[0]} is a DoRA adapter; PEFT cannot combine DoRA adapters.")
        patterned = [
            a for a in weights if self.model.peft_config[a].rank_pattern or self.model.peft_config[a].alpha_pattern
        ]
        if patterned:
            raise UsageError(f"{patterned[0]} has per-module ranks or alphas; lorafit combines uniform adapters only.")
        try:
            self.model.add_weighted_adapter(
                list(weights), list(weights.values()), name, combination_type=combination_type
            )
        except ValueError as exc:  # PEFT's own refusals (e.g. 'linear' with different ranks)
            raise UsageError(f"Cannot combine {', '.join(weights)} with '{combination_type}': {exc}") from None
        self._scale_one(name)
        self.templates[name] = self.templates[next(iter(weights))]
        self.combined[name] = {"weights": weights, "type": combination_type}
        self.use(self.active)  # add_weighted_adapter leaves the active adapter as it was; keep ours

    def _scale_one(self, name: str) -> None:
        """PEFT builds a combined adapter with alpha = rank, i.e. scale 1, with the inputs' scales
        folded into its matrices; but it copies the first input's config, and an inherited rsLoRA
        flag would scale it by sqrt(rank) again (alpha / sqrt(r)). Scale 1 it is, saved so too."""
        from peft.tuners.lora import LoraLayer

        self.model.peft_config[name].use_rslora = False
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and name in module.scaling:
                module.scaling[name] = module.lora_alpha[name] / module.r[name]

    def save(self, name: str, out_dir: str | Path, overwrite: bool = False, option: str = "--out") -> Path:
        """Write adapter `name` as a standard PEFT folder plus lorafit.json. An existing folder is
        refused unless it holds an adapter lorafit saved and `overwrite` is set (see lorafit.outputs)."""
        if name not in self.templates or name == BASE:
            raise UsageError(f"No adapter named '{name}' to save; loaded: {', '.join(self.names[1:])}.")
        check_output_folder(Path(out_dir), "adapter", overwrite, option)
        template = self.templates[name]
        first = self.trained.get(name) or self.trained[next(iter(self.combined[name]["weights"]))]
        record = AdapterRecord(
            base_model=first.record.base_model
            if first.record.base_model.spec is not None
            else BaseModelRecord(spec=self.ref.spec, name=self.ref.name, path=self.ref.path),
            chat_template={"origin": template.origin, "text": template.text},
        )
        combined = self.combined.get(name)
        if combined:
            record.combined_from = {
                "adapters": {a: str(self.trained[a].path) for a in combined["weights"] if a in self.trained},
                "weights": combined["weights"],
                "combination_type": combined["type"],
            }

        def write(folder: Path) -> None:
            # PEFT writes a non-default adapter into a sub-folder named after it: write, then lift it.
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                self.model.save_pretrained(scratch, selected_adapters=[name], safe_serialization=True)
                source = Path(scratch) / name if (Path(scratch) / name).is_dir() else Path(scratch)
                for item in source.iterdir():
                    if item.is_file():
                        shutil.move(str(item), folder / item.name)
            write_json_atomic(folder / "lorafit.json", record.to_json())

        return write_folder_atomically(Path(out_dir), write, kind="adapter")


def parse_named(specs: list[str]) -> dict[str, str]:
    """['law=runs/law', 'runs/med'] -> {'law': 'runs/law', 'med': 'runs/med'} (names must be unique)."""
    named: dict[str, str] = {}
    for spec in specs:
        item = locate_trained(spec)
        if item.name in named:
            raise UsageError(f"Two adapters are named '{item.name}'; name them with --adapter NAME=PATH.")
        named[item.name] = str(item.path)
    return named
