"""Continuous batching over a KV cache: many sequences, each with its own adapter and sampling,
decoded together one token per step. A finished sequence leaves its row at once and a waiting one
takes the place, so no row keeps computing after its answer ended (as rows of one `generate` batch
do until the longest is done), and requests arriving later join between two steps.

Rows of a lane share one transformers DynamicCache, right-aligned: every row's tokens end at the
last column, the columns before its first token are padding masked out, and its own position ids
count its own tokens, as `generate` does with left padding. Sequences of different adapters share
a lane through PEFT's mixed-batch forward (`adapter_names`); an adapter PEFT cannot mix (DoRA) gets
a lane of its own. Waiting sequences are admitted in turn per adapter, so none starves."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorafit.compute.sampling import Choice, Sampling, choose_tokens

ADAPTER_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
SHARED_LANE = "shared"


@dataclass
class Sequence:
    """One prompt being answered."""

    prompt: list[int]
    sampling: Sampling
    adapter: str | None = None  # None: the model as it stands; a name (or ADAPTER_BASE): chosen per row
    lane: str = SHARED_LANE
    generator: torch.Generator | None = None
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class TokenStep:
    """One token a sequence produced; `finish_reason` set on its last ('stop': a stop id, 'length')."""

    sequence: Sequence
    choice: Choice
    finish_reason: str | None


@dataclass
class Lane:
    """Rows decoded by one forward call, over one cache."""

    rows: list[Sequence]
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # [rows, columns]: 1 where a row has a token
    positions: torch.Tensor  # [rows]: the next token's position id
    last: torch.Tensor  # [rows]: the token to feed next


class ContinuousBatcher:
    """Add sequences, call `step()` until `busy` is False; each step returns the tokens made."""

    def __init__(
        self,
        model,
        device: torch.device,
        max_batch: int = 16,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        prefill_tokens: int = 4096,
    ):
        self.model = model
        self.device = device
        self.max_batch = max_batch
        self.autocast = autocast
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled per step, so decoding rows wait little
        self.waiting: dict[str | None, deque[Sequence]] = {}
        self.lanes: dict[str, Lane] = {}
        self.cancelled: set[int] = set()
        self.freed = 0  # running sequences cancelled before their end (their rows freed)

    @property
    def max_positions(self) -> int | None:
        """The model's context: a row that reaches it ends with 'length'."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    @property
    def running(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values())

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self.waiting.values())

    @property
    def busy(self) -> bool:
        return bool(self.running or self.queued)

    def adapters_in_use(self) -> set[str | None]:
        return {s.adapter for lane in self.lanes.values() for s in lane.rows} | {
            s.adapter for queue in self.waiting.values() for s in queue
        }

    def add(self, sequence: Sequence) -> None:
        if not sequence.prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.waiting.setdefault(sequence.adapter, deque()).append(sequence)

    def cancel(self, sequence_id: int) -> None:
        """Drop a sequence (its client went away, or a stop string ended it): its row is freed at the
        start of the next step."""
        self.cancelled.add(sequence_id)

    @torch.inference_mode()
    def step(self) -> list[TokenStep]:
        self._drop_cancelled()
        made: list[TokenStep] = []
        for key in list(self.lanes):
            made += self._decode(key)
        made += self._admit()
        return made

    def _drop_cancelled(self) -> None:
        if not self.cancelled:
            return
        for adapter, queue in list(self.waiting.items()):
            kept = deque(s for s in queue if s.id not in self.cancelled)
            if kept:
                self.waiting[adapter] = kept
            else:
                del self.waiting[adapter]
        for key, lane in list(self.lanes.items()):
            keep = [r for r, s in enumerate(lane.rows) if s.id not in self.cancelled]
            self.freed += len(lane.rows) - len(keep)
            self._keep_rows(key, keep)
        self.cancelled.clear()

    def _next_waiting(self, free: int) -> list[Sequence]:
        """Up to `free` waiting sequences, one adapter's queue after another in turn, within the
        step's prefill budget (the first always comes, however long)."""
        picked: list[Sequence] = []
        tokens = 0
        while len(picked) < free and self.waiting:
            adapter = next(iter(self.waiting))
            queue = self.waiting.pop(adapter)
            if picked and tokens + len(queue[0].prompt) > self.prefill_tokens:
                self.waiting[adapter] = queue
                break
            sequence = queue.popleft()
            picked.append(sequence)
            tokens += len(sequence.prompt)
            if queue:
                self.waiting[adapter] = queue  # to the back of the turn order
        return picked

    def _admit(self) -> list[TokenStep]:
        picked = self._next_waiting(self.max_batch - self.running)
        made: list[TokenStep] = []
        for key in dict.fromkeys(s.lane for s in picked):
            made += self._prefill(key, [s for s in picked if s.lane == key])
        return made

    def _prefill(self, key: str, rows: list[Sequence]) -> list[TokenStep]:
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, sequence in enumerate(rows):
            ids[row, width - len(sequence.prompt) :] = torch.as_tensor(sequence.prompt)
            mask[row, width - len(sequence.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()  # full layers, so rows can be padded and stacked alike in every one
        logits = self._forward(rows, ids, mask, positions, cache)
        lane = Lane(rows, cache, mask, mask.sum(-1), ids[:, -1])
        made = self._choose(lane, logits)
        if key in self.lanes:
            lane = merge_lanes(self.lanes[key], lane)
        self.lanes[key] = lane
        self._retire(key)
        return made

    def _decode(self, key: str) -> list[TokenStep]:
        lane = self.lanes[key]
        mask = torch.cat([lane.mask, torch.ones((len(lane.rows), 1), dtype=lane.mask.dtype)], dim=1)
        logits = self._forward(lane.rows, lane.last[:, None], mask, lane.positions[:, None], lane.cache)
        lane.mask = mask
        lane.positions = lane.positions + 1
        made = self._choose(lane, logits)
        self._retire(key)
        return made

    def _forward(self, rows: list[Sequence], ids, mask, positions, cache) -> torch.Tensor:
        """The last position's logits of every row, under each row's adapter."""
        selection, extra = adapter_selection(self.model, [s.adapter for s in rows])
        with selection, self.autocast():
            output = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        return output.logits[:, -1, :]

    def _choose(self, lane: Lane, logits: torch.Tensor) -> list[TokenStep]:
        choices = choose_tokens(logits, [s.sampling for s in lane.rows], [s.generator for s in lane.rows])
        made = []
        limit = self.max_positions
        for row, (sequence, choice) in enumerate(zip(lane.rows, choices)):
            sequence.generated.append(choice.token)
            if choice.token in sequence.sampling.stop_ids:
                sequence.finish_reason = "stop"
            elif len(sequence.generated) >= sequence.sampling.max_new_tokens or (
                limit is not None and int(lane.positions[row]) >= limit
            ):
                sequence.finish_reason = "length"
            made.append(TokenStep(sequence, choice, sequence.finish_reason))
        lane.last = torch.tensor([c.token for c in choices], dtype=torch.long)
        return made

    def _retire(self, key: str) -> None:
        lane = self.lanes[key]
        self._keep_rows(key, [r for r, s in enumerate(lane.rows) if s.finish_reason is None])

    def _keep_rows(self, key: str, keep: list[int]) -> None:
        lane = self.lanes[key]
        if len(keep) == len(lane.rows):
            return
        if not keep:
            del self.lanes[key]
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = lane.mask[index]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns every remaining row pads are dropped
        for layer in lane.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, first:, :]
            layer.values = layer.values[index.to(layer.values.device), :, first:, :]
        lane.rows = [lane.rows[r] for r in keep]
        lane.mask = mask[:, first:]
        lane.positions = lane.positions[index]
        lane.last = lane.last[index]


def merge_lanes(old: Lane, new: Lane) -> Lane:
    """One lane of both: the shorter cache padded on the left to the longer, rows stacked."""
    width = max(old.mask.shape[1], new.mask.shape[1])

    def widen(tensor: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - tensor.shape[-dim_from_end]
        if not missing:
            return tensor
        padding = [0, 0] * (dim_from_end - 1) + [missing, 0]
        return F.pad(tensor, padding)

    for old_layer, new_layer in zip(old.cache.layers, new.cache.layers):
        old_layer.keys = torch.cat([widen(old_layer.keys, 2), widen(new_layer.keys, 2)])
        old_layer.values = torch.cat([widen(old_layer.values, 2), widen(new_layer.values, 2)])
    return Lane(
        rows=old.rows + new.rows,
        cache=old.cache,
        mask=torch.cat([widen(old.mask, 1), widen(new.mask, 1)]),
        positions=torch.cat([old.positions, new.positions]),
        last=torch.cat([old.last, new.last]),
    )


def adapter_selection(model, adapters: list[str | None]) -> tuple[AbstractContextManager, dict]:
    """How to run one forward for rows of these adapters: all None -> the model as it is; all the
    base -> PEFT's adapters disabled; one adapter -> it made active; several -> PEFT's
    mixed-batch `adapter_names`."""
    names = set(adapters)
    if names == {None}:
        return nullcontext(), {}
    if None in names:
        raise ValueError("rows that name their adapter cannot share a batch with rows that do not")
    if len(names) > 1:
        return mixed_batch(model, list(adapters)), {}
    (name,) = names
    if name == ADAPTER_BASE:
        # A plain model (a server with no adapter loaded yet) is the base already.
        return (model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()), {}
    if model.active_adapter != name:
        model.set_adapter(name)
    return nullcontext(), {}


@contextmanager
def mixed_batch(model, adapters: list[str]) -> Iterator[None]:
    """Each row through its own adapter in one forward: PEFT's mixed-batch path (`adapter_names`
    handed to every LoRA layer and modules_to_save wrapper). PEFT itself passes the same names to
    every wrapper and fails on one that lacks a row's adapter (an adapter with modules_to_save
    loaded beside one without, peft 0.21); there the row takes the wrapper's original module."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    def inject(names: list[str]):
        def hook(module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs

        return hook

    handles = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            handles.append(module.register_forward_pre_hook(inject(adapters), with_kwargs=True))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            own = set(getattr(module, "_adapters", ()))
            names = [name if name in own else ADAPTER_BASE for name in adapters]
            handles.append(module.register_forward_pre_hook(inject(names), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def generate_all(batcher: ContinuousBatcher, sequences: list[Sequence]) -> list[Sequence]:
    """Run `sequences` to their ends through `batcher`; returns them with `generated` filled."""
    for sequence in sequences:
        batcher.add(sequence)
    while batcher.busy:
        batcher.step()
    return sequences
