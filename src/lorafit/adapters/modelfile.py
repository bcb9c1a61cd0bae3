"""An Ollama Modelfile beside a GGUF export (FILE.gguf -> FILE.Modelfile): FROM, the chat template
in Ollama's Go-template language, and the stop tokens, so `ollama create NAME -f FILE.Modelfile`
chats as the model was trained.

Jinja (transformers) cannot be translated to Go templates in general; the formats lorafit trains
with are: ChatML (<|im_start|>role ... <|im_end|>, the embedded SmolLM2's, Qwen's) with its default
system prompt, and lorafit's own plain-text default. Other templates get a Modelfile without
TEMPLATE (Ollama then uses the GGUF's own template metadata where it recognises it).
"""

from __future__ import annotations

import re
from pathlib import Path

from lorafit.data.chat_template import DEFAULT_CHAT_TEMPLATE
from lorafit.io import write_text_atomic

CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
CHATML_WITH_SYSTEM = (
    '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}<|im_start|>system\n'
    "{SYSTEM}<|im_end|>\n{{ end }}" + CHATML
)
LORAFIT_DEFAULT = (
    '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
    '{{ else if eq .Role "user" }}### User:\n{{ .Content }}\n\n'
    "{{ else }}### Assistant:\n{{ .Content }}{EOS}\n\n{{ end }}{{ end }}### Assistant:\n"
)


def ollama_template(template: str | None, eos_token: str) -> tuple[str, list[str]] | None:
    """(Go template, stop strings) for a chat template lorafit knows, else None."""
    if not template:
        return None
    if template == DEFAULT_CHAT_TEMPLATE:
        return LORAFIT_DEFAULT.replace("{EOS}", eos_token), [eos_token, "### User:"]
    if "<|im_start|>" in template and "<|im_end|>" in template:
        default_system = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", template)
        if default_system and "loop.first" in template:
            return CHATML_WITH_SYSTEM.replace("{SYSTEM}", default_system.group(1)), ["<|im_end|>", "<|im_start|>"]
        return CHATML, ["<|im_end|>", "<|im_start|>"]
    return None


HEADER = "# Modelfile written by lorafit"  # its last line; `--overwrite` replaces only such files


def modelfile_path(gguf_file: Path) -> Path:
    """FILE.gguf -> FILE.Modelfile (one per export: several can share a folder)."""
    return gguf_file.with_name(f"{gguf_file.stem}.Modelfile")


def modelfile_written_by_lorafit(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith(HEADER) for line in text.splitlines())


def write_modelfile(
    gguf_file: Path, template: str | None, eos_token: str, base_gguf: Path | None = None
) -> tuple[Path, bool]:
    """Write `Modelfile` next to the GGUF file; (its path, whether it carries a TEMPLATE). With
    `base_gguf` the file is a LoRA adapter: FROM the base, ADAPTER the file."""
    translated = ollama_template(template, eos_token)
    if base_gguf is not None:
        lines = [f"FROM {base_gguf}", f"ADAPTER ./{gguf_file.name}", ""]
    else:
        lines = [f"FROM ./{gguf_file.name}", ""]
    if translated:
        go_template, stops = translated
        lines += [f'TEMPLATE """{go_template}"""', ""]
        lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += ["", f"{HEADER} for {gguf_file.name}"]
    out = modelfile_path(gguf_file)
    write_text_atomic(out, "\n".join(lines).strip() + "\n")
    return out, translated is not None
