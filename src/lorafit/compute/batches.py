"""Training batches: a deterministic order over packed blocks, epoch after epoch.

The order is a pure function of (seed, epoch), and the position is (epoch, index), so a run can be
resumed exactly and every rank of a multi-process run agrees on the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorafit.data.pack import PackedBlocks


def epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=generator)


@dataclass
class BlockTensors:
    """Packed blocks as tensors, from which micro-batches are picked by block index."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None  # None: every token is a target
    position_ids: torch.Tensor | None  # None: 0..L-1 (one causal stream per block)

    @classmethod
    def from_packed(cls, blocks: PackedBlocks) -> BlockTensors:
        def tensor(array: np.ndarray | None) -> torch.Tensor | None:
            return None if array is None else torch.as_tensor(np.ascontiguousarray(array), dtype=torch.long)

        return cls(tensor(blocks.input_ids), tensor(blocks.labels), tensor(blocks.position_ids))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The objective's keyword arguments for these blocks."""
        input_ids = self.input_ids[indices].to(device)
        batch = {
            "input_ids": input_ids,
            "labels": input_ids if self.labels is None else self.labels[indices].to(device),
        }
        if self.position_ids is not None:
            batch["position_ids"] = self.position_ids[indices].to(device)
        return batch


@dataclass
class BlockStream:
    """Yields micro-batches of block indices; wraps into the next epoch when one runs out."""

    num_blocks: int
    batch_size: int
    seed: int
    epoch: int = 0
    index: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self._order = epoch_order(self.num_blocks, self.seed, self.epoch)

    def next_indices(self) -> torch.Tensor:
        """The indices of this rank's next micro-batch (the global batch is world_size × batch_size)."""
        wanted = self.batch_size * self.world_size
        picked = []
        while wanted:
            if self.index >= self.num_blocks:
                self.epoch += 1
                self.index = 0
                self._order = epoch_order(self.num_blocks, self.seed, self.epoch)
            take = min(wanted, self.num_blocks - self.index)
            picked.append(self._order[self.index : self.index + take])
            self.index += take
            wanted -= take
        global_batch = torch.cat(picked)
        return global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}
