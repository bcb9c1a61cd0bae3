"""The page's new-run form: its fields from the config model (every key, its description and
default), the values checked by the same pydantic model `lorafit train` uses (errors named by
field), a preview of what the run will train on, and the launch: the config written beside the
run folder (RUNS/NAME.yaml) and the exact `lorafit train` command started in a process of its own."""

from __future__ import annotations

import json
import shlex
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from lorafit.config import RunConfig
from lorafit.config_files import config_to_yaml
from lorafit.ui.runs import RUN_NAME, start_detached, train_command

PREVIEW_ITEMS = 3
PREVIEW_CHARS = 1500


class FormError(ValueError):
    """Field errors: dotted key (or 'name') -> message."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def _kind(annotation) -> tuple[str, list | None]:
    """How the form asks for a value: number, integer, boolean, choice (with its choices), text or
    yaml (lists, mappings, and fields that take several shapes)."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "boolean", None
    if annotation is int:
        return "integer", None
    if annotation is float:
        return "number", None
    if annotation is str:
        return "text", None
    if origin is typing.Literal:
        return "choice", list(typing.get_args(annotation))
    return "yaml", None


def form_fields() -> list[dict]:
    """Every config key, in the config's order, with what the form needs to ask for it."""
    fields = []
    for section, section_field in RunConfig.model_fields.items():
        model = section_field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for name, field in model.model_fields.items():
            kind, choices = _kind(field.annotation)
            default = field.get_default(call_default_factory=True)
            fields.append(
                {
                    "key": f"{section}.{name}",
                    "section": section,
                    "kind": kind,
                    "choices": choices,
                    # A one-line value the form's text box holds (JSON is YAML's flow style).
                    "default": default if kind != "yaml" else json.dumps(default),
                    "description": field.description or "",
                }
            )
    return fields


def _value(kind: str, text) -> object:
    if not isinstance(text, str):
        return text  # a checkbox's boolean, a number already
    if kind in ("text", "choice"):
        return text
    if text.strip() == "":
        raise ValueError("a value is needed")
    return yaml.safe_load(text)


def build_config(values: dict[str, object], out: Path) -> RunConfig:
    """The form's values (dotted key -> text or value) as a RunConfig, or FormError by field."""
    kinds = {f["key"]: f["kind"] for f in form_fields()}
    raw: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for key, text in values.items():
        if key not in kinds:
            errors[key] = "not a config key"
            continue
        section, name = key.split(".", 1)
        try:
            raw.setdefault(section, {})[name] = _value(kinds[key], text)
        except (ValueError, yaml.YAMLError) as error:
            errors[key] = f"cannot be read as YAML ({error})" if isinstance(error, yaml.YAMLError) else str(error)
    raw["out"] = str(out)
    if not errors:
        try:
            return RunConfig.model_validate(raw)
        except ValidationError as error:
            for item in error.errors():
                location = ".".join(str(part) for part in item["loc"][:2])
                errors.setdefault(location, item["msg"])
    raise FormError(errors)


def check_name(root: Path, name: str) -> tuple[Path, Path]:
    """RUNS/NAME (the run folder) and RUNS/NAME.yaml (its config), neither there yet."""
    if not RUN_NAME.match(name or ""):
        raise FormError({"name": "a folder name: letters, digits, '.', '-', '_' (no '/')"})
    folder, config = root / name, root / f"{name}.yaml"
    if folder.exists() or config.exists():
        raise FormError({"name": f"{folder.name} or {config.name} exists already under {root}: choose another name"})
    return folder, config


def shown_command(command: list[str]) -> str:
    """The command as a user would type it (`lorafit` for this interpreter's module)."""
    return shlex.join(["lorafit", *command[3:]])


def launch(root: Path, name: str, values: dict[str, object], processes: int = 1) -> dict:
    """Write RUNS/NAME.yaml and start `lorafit train` on it; refuses a name already taken."""
    folder, config_path = check_name(root, name)
    config = build_config(values, folder)
    root.mkdir(parents=True, exist_ok=True)
    with open(config_path, "x", encoding="utf-8") as handle:  # never over a file that appeared meanwhile
        handle.write(config_to_yaml(config))
    command = train_command(config_path, folder, processes=processes)
    pid = start_detached(command, root / f"{name}.log")
    return {"name": name, "pid": pid, "command": shown_command(command), "config": str(config_path)}


def preview(config: RunConfig, limit: int = PREVIEW_ITEMS) -> dict:
    """The first documents the run reads (raw text, as extracted), or its first instruction examples
    rendered with the chat template, cut into (text, trained) pieces: what the loss is taken on."""
    from lorafit.data.chat_template import conversation_segments, resolve_chat_template
    from lorafit.data.documents import Problems
    from lorafit.data.formats import detect_file_format, field_names, record_to_conversation
    from lorafit.data.readers import find_files, read_file
    from lorafit.data.records import iter_records

    files = find_files(config.data.train)
    if not files:
        raise FormError({"data.train": "no readable file there (.html, .md, .txt, .pdf, .jsonl, .json)"})
    fields = field_names(config.data.fields)
    first = files[0]
    fmt = config.data.format
    if fmt == "auto":
        records = first.suffix.lower() in (".jsonl", ".json")
        fmt = detect_file_format(first, fields, config.data.text_field) if records else "text"
    if fmt == "text":
        items = []
        for path in files:
            for document in read_file(path, config.data.text_field, Problems()):
                items.append({"source": document.source, "text": document.text[:PREVIEW_CHARS]})
                if len(items) >= limit:
                    return {"kind": "documents", "files": len(files), "items": items}
        return {"kind": "documents", "files": len(files), "items": items}
    from lorafit.model.load import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(config.model.base))
    template = resolve_chat_template(tokenizer, config.data.chat_template)
    items = []
    for where, record in iter_records(first, Problems()):
        conversation = record_to_conversation(record, fmt, fields, where)
        segments = conversation_segments(tokenizer, template, conversation.messages, config.data.train_turns)
        items.append({"source": where, "segments": [[text, trained] for text, trained in segments]})
        if len(items) >= limit:
            break
    return {"kind": "examples", "format": fmt, "template": template.origin, "files": len(files), "items": items}
