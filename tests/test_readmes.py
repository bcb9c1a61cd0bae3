"""README.md and README.zh-CN.md document the same commands and config keys, and only real ones."""

from __future__ import annotations

import re
from pathlib import Path

from lorafit.cli import app
from lorafit.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def config_keys() -> set[str]:
    return {
        f"{section}.{key}"
        for section, field in RunConfig.model_fields.items()
        if hasattr(field.annotation, "model_fields")
        for key in field.annotation.model_fields
    }


def command_names() -> set[str]:
    return {command.name or command.callback.__name__ for command in app.registered_commands}


def mentioned(text: str) -> tuple[set[str], set[str]]:
    """(commands, config keys) named in `text`."""
    commands = set(re.findall(r"\blorafit ([a-z]+)\b", text)) & command_names()
    sections = "|".join(s for s, f in RunConfig.model_fields.items() if hasattr(f.annotation, "model_fields"))
    dotted = set(re.findall(rf"\b((?:{sections})\.[a-z_]+)", text))
    return commands, dotted & config_keys()


def test_both_readmes_list_the_same_commands_and_config_keys():
    english = mentioned((ROOT / "README.md").read_text(encoding="utf-8"))
    chinese = mentioned((ROOT / "README.zh-CN.md").read_text(encoding="utf-8"))
    assert english[0] == chinese[0] == command_names(), "every command, in both"
    assert english[1] == chinese[1] == config_keys(), "every config key, in both"


def test_the_english_readme_links_the_chinese_one_at_the_top():
    head = (ROOT / "README.md").read_text(encoding="utf-8")[:2500]
    assert "(README.zh-CN.md)" in head
    assert "二次预训练" in (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
