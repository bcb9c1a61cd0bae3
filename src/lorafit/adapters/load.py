"""Find what a run produced: an adapter (PEFT folder) or a fully fine-tuned model, with the run's
records (lorafit.json, summary.json, metrics.jsonl) when they are there."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lorafit.artifacts import AdapterRecord, RunFolder, RunSummary
from lorafit.errors import UsageError
from lorafit.integrity import check_safetensors, read_json_file

_NAME = re.compile(r"^[\w.+-]+$")


@dataclass
class TrainedLocation:
    """Where a trained adapter or fully fine-tuned model lies, with the records beside it."""

    name: str
    kind: str  # "lora" (PEFT adapter folder) or "full" (transformers model folder)
    path: Path
    run_dir: Path | None  # the run folder that made it, when known
    record: AdapterRecord  # its lorafit.json; empty for a PEFT folder made elsewhere

    def run_summary(self) -> RunSummary:
        """The run's summary.json (every field None when the run is unknown)."""
        summary = RunFolder(self.run_dir).read_summary() if self.run_dir else None
        return summary or RunSummary()

    @property
    def chat_template(self):
        """The ChatTemplate the adapter was trained with (lorafit.json), or None."""
        from lorafit.data.chat_template import ChatTemplate

        recorded = self.record.chat_template or {}
        return ChatTemplate(recorded["text"], recorded.get("origin", "recorded")) if recorded.get("text") else None

    @property
    def rope_scaling(self) -> dict | None:
        """The model.rope_scaling it was trained with (lorafit.json's config), or None."""
        return ((self.record.config or {}).get("model") or {}).get("rope_scaling")

    @property
    def base_spec(self) -> str | None:
        """The base model the adapter was trained on, as the user named it ('' = embedded default)."""
        return self.record.base_model.spec


def check_adapter_files(path: Path) -> None:
    """A PEFT adapter folder whose config parses and whose weights file is whole (a cut file would
    otherwise fail deep inside PEFT, or load as the wrong shapes)."""
    config = read_json_file(path / "adapter_config.json")
    if not isinstance(config.get("peft_type", "LORA"), str):
        raise UsageError(f"{path / 'adapter_config.json'}: 'peft_type' must be a string such as \"LORA\".")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)
    elif not (path / "adapter_model.bin").is_file():
        raise UsageError(f"{path}: no adapter_model.safetensors beside adapter_config.json; the adapter is incomplete.")


def locate_trained(spec: str) -> TrainedLocation:
    """`spec` is PATH or NAME=PATH; PATH a run folder, its adapter/ or model/, or a PEFT adapter folder."""
    name, path_text = "", spec
    left, sep, right = spec.partition("=")
    if sep and _NAME.match(left) and not Path(spec).exists():
        name, path_text = left, right
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise UsageError(f"--adapter {spec}: no such folder; name a run folder or an adapter folder.")
    run_dir: Path | None = None
    saved = RunFolder(path).trained()
    if saved is not None:
        run_dir, path, kind = path, saved, "lora" if saved.name == "adapter" else "full"
    elif (path / "adapter_config.json").is_file():
        kind = "lora"
    elif (path / "config.json").is_file() and (path / "lorafit.json").is_file():
        kind = "full"
    else:
        raise UsageError(
            f"--adapter {spec}: {path} is not a run folder, a PEFT adapter folder (adapter_config.json) or a "
            "model folder saved by lorafit; point it at one of those."
        )
    if run_dir is None and RunFolder(path.parent).is_run():
        run_dir = path.parent
    if not name:
        name = (run_dir or path).resolve().name
    if kind == "lora":
        check_adapter_files(path)
    else:
        read_json_file(path / "config.json")
    if run_dir is not None:
        RunFolder(run_dir).read_summary()  # read for the report's costs: a damaged one is named now
    record = AdapterRecord.read(path) or AdapterRecord(lorafit_version=None)
    return TrainedLocation(name=name, kind=kind, path=path, run_dir=run_dir, record=record)


def check_same_base(trained: TrainedLocation, base_ref, base_fingerprint: str) -> None:
    """Refuse an adapter trained on other base weights than the ones loaded: it would load (same
    shapes) and quietly compute nonsense."""
    recorded = trained.record.base_model
    theirs = recorded.weights_fingerprint
    if theirs and base_fingerprint and not same_weights(theirs, base_fingerprint, base_ref):
        raise UsageError(
            f"{trained.name} ({trained.path}) was trained on {recorded.describe()} "
            f"(weights {theirs}), but the base model loaded is {base_ref.name} (weights {base_fingerprint}); pass "
            "--base with the model it was trained on, or --allow-base-mismatch to evaluate it anyway."
        )


def same_weights(recorded: str, current: str, base_ref) -> bool:
    """Whether a recorded weights fingerprint names the weights loaded. One an older lorafit
    recorded (of the weight files' names and sizes, without the content prefix) is compared with
    the same kind of fingerprint, so its adapters still load on their own base."""
    from lorafit.model.load import CONTENT_PREFIX, file_listing_fingerprint

    if recorded.startswith(CONTENT_PREFIX):
        return recorded == current
    return recorded == file_listing_fingerprint(base_ref)


def resolve_trained_base(trained: list[TrainedLocation], base: str | None, allow_mismatch: bool = False):
    """(BaseModelRef, weights fingerprint) of the base to load under `trained`: `base` if given,
    else the one the first of them records (the embedded default with none); each is checked
    against it unless `allow_mismatch`."""
    from lorafit.model.load import resolve_base, weights_fingerprint

    if base is None:
        recorded = [item.base_spec for item in trained if item.base_spec is not None]
        if trained and not recorded:
            raise UsageError(f"{trained[0].path} records no base model (no lorafit.json); pass --base MODEL.")
        base = recorded[0] if recorded else ""
    # A rope scaling an adapter was trained with is part of its model: the base is loaded with it.
    scalings = {json.dumps(item.rope_scaling, sort_keys=True): item for item in trained}
    if len(scalings) > 1:
        first, second = list(scalings.values())[:2]
        raise UsageError(
            f"{first.name} was trained with model.rope_scaling {first.rope_scaling} and {second.name} with "
            f"{second.rope_scaling}: they need differently scaled bases; use them one at a time."
        )
    ref = resolve_base(base, trained[0].rope_scaling if trained else None)
    fingerprint = weights_fingerprint(ref)
    if not allow_mismatch:
        for item in trained:
            check_same_base(item, ref, fingerprint)
    return ref, fingerprint


def attach_adapter(model, path: Path, name: str):
    """Attach the PEFT adapter at `path` as `name`: a plain model is wrapped in a PeftModel, a
    PeftModel gains one more named adapter beside the others. Returns the PeftModel."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, str(path), adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or modules of another base model
        first = str(exc).strip().splitlines()
        raise UsageError(
            f"{path}: the adapter does not fit the base model loaded ({first[-1] if first else type(exc).__name__}); "
            "pass --base with the model it was trained on."
        ) from None


def adapter_parameters(path: Path) -> int | None:
    """Parameters stored in a PEFT adapter's safetensors file (read from its header only)."""
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            count = 1
            for size in handle.get_slice(key).get_shape():
                count *= size
            total += count
    return total
