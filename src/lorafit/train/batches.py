"""Training batches: a deterministic order over packed blocks, epoch after epoch.

The order is a pure function of (seed, epoch), and the position is (epoch, index), so a run can be
resumed exactly and every rank of a multi-process run agrees on the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=generator)


def stack_blocks(blocks: list[np.ndarray]) -> torch.Tensor:
    return torch.as_tensor(np.stack(blocks), dtype=torch.long)


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
