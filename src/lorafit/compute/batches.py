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
    """Packed blocks from which micro-batches are picked by block index. The arrays stay as they
    were packed (a memory-mapped token shard stays on disk): a batch's rows are read and widened
    to int64 tensors when it is taken."""

    input_ids: np.ndarray
    labels: np.ndarray | None  # None: every token is a target
    position_ids: np.ndarray | None  # None: 0..L-1 (one causal stream per block)

    @classmethod
    def from_packed(cls, blocks: PackedBlocks) -> BlockTensors:
        return cls(blocks.input_ids, blocks.labels, blocks.position_ids)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The objective's keyword arguments for these blocks."""
        rows = indices.numpy()

        def take(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(array[rows], dtype=np.int64)).to(device)

        input_ids = take(self.input_ids)
        batch = {"input_ids": input_ids, "labels": input_ids if self.labels is None else take(self.labels)}
        if self.position_ids is not None:
            batch["position_ids"] = take(self.position_ids)
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
