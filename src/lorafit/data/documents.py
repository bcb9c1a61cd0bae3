"""The record that flows through data preparation, and the problems met on the way."""

from __future__ import annotations

from dataclasses import dataclass, field


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


def print_problems(console, problems: list[Problem], listed_in: str, shown: int = 20) -> None:
    """The first `shown` problems, one line each, and how many more `listed_in` holds."""
    for problem in problems[:shown]:
        console.print(f"[yellow]skipped[/] {problem.where}: {problem.message}", highlight=False)
    if len(problems) > shown:
        console.print(f"[yellow]skipped {len(problems) - shown} more records or files[/] (listed in {listed_in})")
