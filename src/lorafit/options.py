"""The ranges of command-line options, checked like config keys: an option that stands for a config
key (`prepare --min-chars` for `data.min_chars`) is validated by that key's field, one with no config
key by a `CommandOptions` field. Either way NaN, infinity and out-of-range values get one message
naming the option."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from lorafit.config import RunConfig, Section
from lorafit.errors import ConfigError


class CommandOptions(Section):
    """Options of commands that are not run-config keys, with their types and ranges; checked like
    config keys (`check_options`), so every number a user types has its range beside the config's."""

    eval_batch_size: int = Field(8, ge=1, description="Perplexity blocks evaluated together.")
    max_blocks: int = Field(0, ge=0, description="Score only the first N blocks of each text (0 = all).")
    max_shard_mb: int = Field(2048, ge=1, description="Largest safetensors shard, in MB.")
    combine_weights: list[float] = Field(
        default_factory=list, min_length=1, description="One weight per adapter combined."
    )
    chat_max_new_tokens: int = Field(256, ge=1, description="Tokens per chat answer (greedy).")


def _option_field(key: str) -> tuple[type[Section], str]:
    section, _, name = key.rpartition(".")
    if section == "options":
        return CommandOptions, name
    annotation = RunConfig.model_fields[section].annotation
    assert isinstance(annotation, type) and issubclass(annotation, Section), key
    return annotation, name


def check_options(values: dict[str, tuple[str, Any]]) -> None:
    """Check command-line values against the config key (or CommandOptions field) each stands
    for: {'--near-dup-threshold': ('data.near_dup_threshold', 2.0)} -> ConfigError naming the
    option, what is wrong and the allowed range. Every problem is listed, one per line."""
    problems = []
    for option, (key, value) in values.items():
        if value is None:
            continue
        section, name = _option_field(key)
        holder = section.model_construct()
        try:
            setattr(holder, name, value)  # validate_assignment: the field's type, range and finiteness
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ").replace("Input should", "should")
            problems.append(f"{option} {value!r}: {message} ({key}).")
    if problems:
        raise ConfigError("\n".join(problems))


def default_of(key: str) -> Any:
    """The default of a config key ('data.min_chars') or command option ('options.max_blocks'):
    the commands' and the Python API's defaults come from here, so each is written once."""
    section, name = _option_field(key)
    field = section.model_fields[name]
    return field.default_factory() if field.default_factory is not None else field.default
