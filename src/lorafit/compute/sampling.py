"""The next token of each row from its logits: greedy or sampled (temperature, nucleus, a seeded
generator per sequence), with the log-probabilities OpenAI's `logprobs` report."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How one sequence chooses its tokens and when it ends."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy (argmax), bit for bit what `generate(do_sample=False)` picks
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the k likeliest

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Choice:
    """The token one row chose, with its log-probability and the likeliest alternatives when asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def seeded_generator(sampling: Sampling, offset: int = 0) -> torch.Generator | None:
    """A CPU generator for a sampled sequence: seeded by the request (offset per choice, so n choices
    differ but replay alike), else from torch's global generator. None for greedy sequences."""
    if sampling.greedy:
        return None
    generator = torch.Generator()
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed((sampling.seed + offset) % (2**63))
    return generator


def choose_tokens(
    logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]
) -> list[Choice]:
    """One Choice per row of `logits` [rows, vocab]. Greedy rows share one argmax; sampled rows draw
    from softmax(logits / temperature) cut to the top-p nucleus, with their own generator."""
    logits = logits.float()
    picked = logits.argmax(dim=-1).tolist()
    for row, sampling in enumerate(samplings):
        if not sampling.greedy:
            picked[row] = sample_one(logits[row], sampling, generators[row])
    choices = [Choice(token) for token in picked]
    wanting = [row for row, sampling in enumerate(samplings) if sampling.logprobs is not None]
    if wanting:
        logprobs = torch.log_softmax(logits[wanting], dim=-1)
        for at, row in enumerate(wanting):
            choices[row].logprob = float(logprobs[at, picked[row]])
            k = samplings[row].logprobs or 0
            if k:
                values, ids = logprobs[at].topk(k)
                choices[row].top = list(zip(ids.tolist(), values.tolist()))
            else:
                choices[row].top = []
    return choices


def sample_one(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    # Shifted by the maximum first: a tiny temperature then gives 0 and -inf, never inf - inf = NaN.
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the likelier tokens
        sorted_probs[before >= sampling.top_p] = 0.0  # the likeliest token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
