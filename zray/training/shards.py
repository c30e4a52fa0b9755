"""One worker's shard of a learner's training data, served as micro batches by index (numpy only)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from zray.config import LearnerConfig


class ShardBatches:
    """One worker's shard, read once into memory, served as micro batches by index.

    Micro batch `i` (0-based, counted over the whole run) is the `i % batches_per_epoch`-th slice of epoch
    `i // batches_per_epoch`'s permutation of the shard, seeded by (seed, epoch, rank): a pure function of the
    index, so a resumed worker continues exactly where the checkpoint left off, without re-reading anything.

    With `cfg.length_window = k > 0`, `lengths_of(columns)` gives every row's length, and each run of k micro
    batches of the permutation is regrouped: its rows sorted by length, cut into k micro batches, and those taken
    in an order seeded by (seed, epoch, window) alone, the same on every rank, so the ranks of one step hold
    micro batches of similar length (a step waits for its slowest rank).
    """

    def __init__(self, shard: Any, cfg: LearnerConfig, *, rank: int,
                 lengths_of: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None) -> None:
        parts: dict[str, list[np.ndarray]] = {}
        for rows in shard.iter_batches(batch_size=4096, batch_format="numpy"):
            for key, column in rows.items():
                parts.setdefault(key, []).append(np.asarray(column))
        self.columns = {key: np.concatenate(chunks) for key, chunks in parts.items()}
        self.num_rows = len(next(iter(self.columns.values()))) if self.columns else 0
        self.batch_size, self.seed, self.rank, self.shuffle = cfg.micro_batch_size, cfg.seed, rank, cfg.shuffle
        self.window = cfg.length_window
        self.batches_per_epoch = self.num_rows // self.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"worker {rank}: its shard has {self.num_rows} rows, fewer than "
                             f"LearnerConfig.micro_batch_size={self.batch_size}")
        self.lengths: np.ndarray | None = None
        if self.window:
            if lengths_of is None:
                raise ValueError(f"LearnerConfig.length_window={self.window} needs the rows' lengths (a task with "
                                 "row_lengths)")
            self.lengths = np.asarray(lengths_of(self.columns), dtype=np.float64)
            if self.lengths.shape != (self.num_rows,):
                raise ValueError(f"row_lengths gave shape {self.lengths.shape} for {self.num_rows} rows: expected "
                                 f"({self.num_rows},)")
        self._epoch, self._order = -1, np.arange(self.num_rows)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            order = rng.permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)
            self._order = self._grouped(order, epoch) if self.window else order
        return self._order

    def _grouped(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """`order` with each run of `window` micro batches sorted by row length and its micro batches reordered."""
        assert self.lengths is not None
        b, out = self.batch_size, order.copy()
        for first in range(0, self.batches_per_epoch, self.window):
            k = min(self.window, self.batches_per_epoch - first)
            rows = order[first * b:(first + k) * b]
            rows = rows[np.argsort(self.lengths[rows], kind="stable")].reshape(k, b)
            if self.shuffle:  # rank-independent: every rank takes its r-th shortest micro batch at the same step
                rows = rows[np.random.default_rng([self.seed, epoch, first, 1]).permutation(k)]
            out[first * b:(first + k) * b] = rows.ravel()
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, slot = divmod(index, self.batches_per_epoch)
        rows = self.order(epoch)[slot * self.batch_size:(slot + 1) * self.batch_size]
        return {key: column[rows] for key, column in self.columns.items()}
