"""One request in flight: its choices as sequences on the worker, their tokens turned into text
deltas (stop strings applied), and what the response or the stream needs at the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lorafit.compute.continuous import Sequence, TokenStep
from lorafit.compute.sampling import Sampling, seeded_generator
from lorafit.serve.host import ServedModel
from lorafit.serve.protocol import ChoiceResult, TokenLogprob
from lorafit.serve.text import TextStream
from lorafit.serve.worker import Failure, Worker


@dataclass
class Delta:
    """New output of one choice: text made final, its tokens' log-probabilities, and the finish."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


class GenerationFailedError(Exception):
    """The model failed while this request was decoding (the server's fault: a 500)."""


class RequestRun:
    def __init__(
        self,
        worker: Worker,
        served: ServedModel,
        prompt: list[int],
        sampling: Sampling,
        n: int,
        stops: list[str],
        first_index: int = 0,
    ):
        self.worker = worker
        self.tokenizer = worker.host.tokenizer
        self.prompt = prompt
        self.sequences = [
            Sequence(prompt, sampling, served.adapter, served.lane, seeded_generator(sampling, offset=i))
            for i in range(n)
        ]
        self.first_index = first_index  # of its choices in the response (a prompt list answers n each)
        self.texts = {s.id: TextStream(self.tokenizer, stops) for s in self.sequences}
        self.results = {s.id: ChoiceResult(first_index + i) for i, s in enumerate(self.sequences)}
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[TokenStep | Failure] = asyncio.Queue()
        self.open = {s.id for s in self.sequences}

    def start(self) -> None:
        """Queue the choices (QueueFullError when the server's queue has no room)."""
        self.worker.submit(self.sequences, self._from_worker)

    def _from_worker(self, event: TokenStep | Failure) -> None:  # on the model's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Free the rows of choices still running (the client left, or the request ended)."""
        running = [s for s in self.sequences if s.id in self.open]
        self.open.clear()
        if running:
            self.worker.cancel(running)

    @property
    def completion_tokens(self) -> int:
        return sum(r.tokens for r in self.results.values())

    async def deltas(self) -> AsyncIterator[Delta]:
        """Each choice's new text as its tokens come, until every choice has finished."""
        while self.open:
            event = await self.events.get()
            if isinstance(event, Failure):
                self.open.clear()
                raise GenerationFailedError(event.message)
            delta = self._take(event)
            if delta is not None:
                yield delta

    def _take(self, step: TokenStep) -> Delta | None:
        sequence = step.sequence
        if sequence.id not in self.open:
            return None  # a token made before our cancel reached the worker
        result, stream = self.results[sequence.id], self.texts[sequence.id]
        result.tokens += 1
        finish = step.finish_reason
        text, logprobs = "", []
        if not (finish == "stop" and step.choice.token in sequence.sampling.stop_ids):
            text = stream.add(step.choice.token)
            if step.choice.logprob is not None:
                logprobs.append(self._logprob(step))
        if stream.stopped:
            finish = "stop"
            self.worker.cancel([sequence])
        if finish is not None:
            text += stream.finish()
            self.open.discard(sequence.id)
            result.finish_reason = finish
        result.text += text
        result.logprobs += logprobs
        if not text and not logprobs and finish is None:
            return None
        return Delta(result.index, text, logprobs, finish)

    def _logprob(self, step: TokenStep) -> TokenLogprob:
        decode = self.tokenizer.decode
        top = [(decode([token]), value) for token, value in step.choice.top or []]
        return TokenLogprob(decode([step.choice.token]), step.choice.logprob, top)

    def choice_results(self) -> list[ChoiceResult]:
        return [self.results[s.id] for s in self.sequences]
