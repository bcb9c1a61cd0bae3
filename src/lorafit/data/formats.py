"""Instruction records -> conversations: alpaca, chat (`messages`) and ShareGPT (`conversations`).

Every format becomes the same thing, a list of {role, content} messages with roles system, user
and assistant, so one chat template renders them all. A record that does not fit (a missing
field, an empty answer, an unknown role, a chat ending on a user turn) is reported with its file
and line and skipped; the rest is used.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lorafit.config import RECORD_FIELDS
from lorafit.data.documents import Problems
from lorafit.data.records import iter_records
from lorafit.errors import DataError

INSTRUCTION_FORMATS = ("alpaca", "chat", "sharegpt")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
DETECT_RECORDS = 20


@dataclass
class Conversation:
    """One training or test example. For multiple-choice records, `messages` is the prompt only."""

    messages: list[dict[str, str]]
    source: str
    choices: list[str] | None = None
    answer: int | None = None  # index into `choices`

    @property
    def text(self) -> str:
        """All message contents, for hashing (split, dedup) and decontamination."""
        return "\n".join(m["content"] for m in self.messages)


class RecordError(ValueError):
    """A record that does not fit its format; the message says which field and what to do."""


def field_names(overrides: dict[str, str]) -> dict[str, str]:
    return {name: overrides.get(name, name) for name in RECORD_FIELDS}


def detect_format(record: dict, fields: dict[str, str], text_field: str) -> str | None:
    """The format a record looks like, or None if it fits none."""
    if isinstance(record.get(fields["messages"]), list):
        return "chat"
    if isinstance(record.get(fields["conversations"]), list):
        return "sharegpt"
    if fields["instruction"] in record and (fields["output"] in record or fields["choices"] in record):
        return "alpaca"
    if isinstance(record.get(text_field), str):
        return "text"
    return None


def detect_file_format(path: Path, fields: dict[str, str], text_field: str) -> str:
    """The format of a JSONL/JSON file, from its first readable records."""
    seen: list[str] = []
    problems = Problems()
    records = 0
    for _, record in iter_records(path, problems):
        records += 1
        found = detect_format(record, fields, text_field)
        if found:
            return found
        seen = sorted(map(str, record))
        if records >= DETECT_RECORDS:
            break
    if not records:
        if problems.items:
            first = problems.items[0]
            raise DataError(
                f"{path}: no readable record ({len(problems.items)} bad, the first {first.where}: {first.message}); "
                "fix the file (one JSON object per line) or leave it out."
            )
        raise DataError(f"{path}: the file holds no records (it is empty); add records or leave it out.")
    raise DataError(
        f"{path}: cannot tell the record format (fields: {', '.join(seen) or 'none'}). Expected "
        f"'{fields['messages']}' (chat), '{fields['conversations']}' (sharegpt), '{fields['instruction']}' + "
        f"'{fields['output']}' (alpaca) or '{text_field}' (text); set data.format and data.fields."
    )


def _text(record: dict, name: str, required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError(f"missing field '{name}'; add it or map it with data.fields")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _choices(record: dict, fields: dict[str, str]) -> tuple[list[str], int] | None:
    choices = record.get(fields["choices"])
    if choices is None:
        return None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise RecordError(f"field '{fields['choices']}' must be a list of at least two strings")
    answer = record.get(fields["answer"])
    letters = string.ascii_uppercase[: len(choices)]
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return choices, answer
    if isinstance(answer, str) and answer in choices:
        return choices, choices.index(answer)
    if isinstance(answer, str) and answer.strip().upper() in letters and len(answer.strip()) == 1:
        return choices, letters.index(answer.strip().upper())
    raise RecordError(
        f"field '{fields['answer']}' must be a choice's index (0-{len(choices) - 1}), letter ({letters[0]}-"
        f"{letters[-1]}) or text, got {answer!r}"
    )


def _alpaca(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    instruction = _text(record, fields["instruction"], required=True).strip()
    extra = _text(record, fields["input"], required=False).strip()
    if not instruction:
        raise RecordError(f"field '{fields['instruction']}' is empty")
    messages = []
    system = _text(record, fields["system"], required=False).strip()
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    if fields["choices"] not in record:
        messages.append({"role": "assistant", "content": _text(record, fields["output"], required=True)})
    return messages


def _turns(record: dict, fields: dict[str, str], fmt: str) -> list[dict[str, str]]:
    list_field = fields["messages"] if fmt == "chat" else fields["conversations"]
    role_field, content_field = (
        (fields["role"], fields["content"]) if fmt == "chat" else (fields["from"], fields["value"])
    )
    turns = record.get(list_field)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field '{list_field}' must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {number} of '{list_field}' is not an object")
        speaker = turn.get(role_field)
        role = speaker if fmt == "chat" else SHAREGPT_ROLES.get(str(speaker).lower())
        if role not in ROLES:
            known = ", ".join(ROLES if fmt == "chat" else sorted(SHAREGPT_ROLES))
            raise RecordError(f"turn {number}: unknown role {speaker!r} in '{role_field}' (known: {known})")
        content = turn.get(content_field)
        if not isinstance(content, str):
            raise RecordError(f"turn {number}: '{content_field}' must be a string")
        if role == "system" and messages:
            raise RecordError(f"turn {number}: a system message may only come first")
        messages.append({"role": role, "content": content})
    return messages


def record_to_conversation(record: dict, fmt: str, fields: dict[str, str], where: str) -> Conversation:
    """Convert one record; raises RecordError with a message naming the field."""
    messages = _alpaca(record, fields) if fmt == "alpaca" else _turns(record, fields, fmt)
    mc = _choices(record, fields)
    if mc is not None:
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the choices are the candidate answers
        if not messages or messages[-1]["role"] != "user":
            raise RecordError("a multiple-choice record needs a question (a user turn) before its choices")
        return Conversation(messages=messages, source=where, choices=mc[0], answer=mc[1])
    if messages[-1]["role"] != "assistant":
        raise RecordError("the conversation ends on a user turn; it needs an assistant answer to train on")
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("the conversation has no user turn")
    for number, message in enumerate(messages, start=1):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(f"turn {number}: the assistant answer is empty")
    return Conversation(messages=messages, source=where)


def read_conversations(
    paths: Iterable[Path], fmt: str, fields: dict[str, str], problems: Problems
) -> list[Conversation]:
    """Conversations from instruction files of format `fmt`; bad records go to `problems`."""
    conversations = []
    for path in paths:
        for where, record in iter_records(path, problems):
            try:
                conversations.append(record_to_conversation(record, fmt, fields, where))
            except RecordError as exc:
                problems.add(where, "invalid_record", str(exc))
    return conversations
