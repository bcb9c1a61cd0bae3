"""Run configurations from files: YAML read and checked, `--set` overrides applied, validation
errors turned into one line per problem naming the key and the fix, and the field reference that
`lorafit train --help` and configs/full.yaml are checked against."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lorafit.config import RunConfig
from lorafit.errors import ConfigError


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(choices))}."


def _section_fields(path: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in path:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted field, what is wrong and how to fix it."""
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        field = ".".join(loc)
        if item["type"] == "extra_forbidden":
            hint = _closest(loc[-1], _section_fields(loc[:-1]))
            lines.append(f"{source}: unknown key '{field}'.{hint}")
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            message = item["msg"].removeprefix("Value error, ")
            if not loc:  # a rule across sections: the message names its fields
                lines.append(f"{source}: {message}.")
            else:
                lines.append(f"{source}: {field}: {message}{shown}.")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); values are YAML so lists and numbers work."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=1e-4.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__}).") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in `raw`: --set's 'KEY=VALUE' strings (YAML values), or a {key: value} dict
    (the Python API's `overrides`, values as they are)."""
    if isinstance(overrides, dict):
        pairs = [(str(key).split("."), value, f"{key}={value!r}") for key, value in overrides.items()]
    else:
        pairs = [(*parse_override(item), item) for item in overrides]
    for keys, value, item in pairs:
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{'.'.join(keys[: depth + 1])}' is not a section.")
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the run's YAML config file (see configs/ for examples).")
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; see configs/ for examples.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}; fix the YAML syntax.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...).")
    return raw


def build_config(raw: dict[str, Any], source: str, base_dir: Path | None = None) -> RunConfig:
    """Validate a raw mapping; relative data paths are taken relative to `base_dir`."""
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None
    if base_dir is not None:
        config = resolve_data_paths(config, base_dir)
    return config


def resolve_data_paths(config: RunConfig, base_dir: Path) -> RunConfig:
    """Data paths in a config file are relative to the working directory if they exist there,
    else to the config file's folder (so a config works from the repo root and beside its data)."""

    def resolve(entries: list[str]) -> list[str]:
        out = []
        for entry in entries:
            if entry == "builtin":  # eval.general's / data.replay_prompts' shipped sample, not a path
                out.append(entry)
                continue
            path = Path(entry).expanduser()
            if not path.is_absolute() and not path.exists() and (base_dir / path).exists():
                path = base_dir / path
            out.append(str(path))
        return out

    data = config.data.model_copy(
        update={
            "train": resolve(config.data.train),
            "valid": resolve(config.data.valid),
            "exclude": resolve(config.data.exclude),
            "replay_prompts": resolve([config.data.replay_prompts])[0],  # 'builtin' kept as it is
        }
    )
    template = config.data.chat_template
    if template.endswith(".jinja") and not Path(template).expanduser().is_absolute():
        data = data.model_copy(update={"chat_template": resolve([template])[0]})
    lora = config.lora
    if lora.init_from:
        lora = lora.model_copy(update={"init_from": resolve([lora.init_from])[0]})
    evaluation = config.eval.model_copy(
        update={"tasks": resolve(config.eval.tasks), "general": resolve(config.eval.general)}
    )
    return config.model_copy(update={"data": data, "lora": lora, "eval": evaluation})


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config, apply `--set` overrides, validate; errors name the field and the fix."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    return build_config(raw, str(path), base_dir=path.resolve().parent)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def field_reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field: the source of `train --help`."""
    rows = []
    for section_name, section_field in RunConfig.model_fields.items():
        annotation = section_field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name, field in annotation.model_fields.items():
                default = field.get_default(call_default_factory=True)
                rows.append((f"{section_name}.{name}", repr(default), field.description or ""))
        else:
            rows.append((section_name, repr(section_field.default), section_field.description or ""))
    return rows
