"""The record that flows through data preparation, and the problems met on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar


class HasText(Protocol):
    """A document, or an instruction example (its messages' text): what splitting and dedup read."""

    @property
    def text(self) -> str: ...


Item = TypeVar("Item", bound=HasText)


@dataclass
class Document:
    text: str
    source: str


@dataclass
class Problem:
    """Something skipped, reported to the user with where it happened and why."""

    where: str
    reason: str
    message: str


@dataclass
class Problems:
    items: list[Problem] = field(default_factory=list)

    def add(self, where: str, reason: str, message: str) -> None:
        self.items.append(Problem(where, reason, message))

    def count(self, reason: str) -> int:
        return sum(1 for item in self.items if item.reason == reason)

    def records(self) -> list[dict[str, str]]:
        """The problems as JSON records (`where`, `reason`, `message`), for summaries and reports."""
        return [{"where": p.where, "reason": p.reason, "message": p.message} for p in self.items]


def first_of(problems: list[Problem], shown: int = 3) -> str:
    """'where: why; where: why' for the first `shown` problems (an error's evidence)."""
    return "; ".join(f"{p.where}: {p.message}" for p in problems[:shown])


def print_problems(console, problems: list[Problem], listed_in: str, shown: int = 20) -> None:
    """The first `shown` problems, one line each, and how many more `listed_in` holds."""
    for problem in problems[:shown]:
        console.print(f"[yellow]skipped[/] {problem.where}: {problem.message}", highlight=False)
    if len(problems) > shown:
        console.print(f"[yellow]skipped {len(problems) - shown} more records or files[/] (listed in {listed_in})")
