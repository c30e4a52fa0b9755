"""The learner's data order (`ShardBatches`): a pure function of the micro batch index; length grouping sorts
each window's rows into micro batches of similar length, keeps every row of the window, and lines up the ranks.
No Ray cluster: a shard here is any object with `iter_batches`."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")

from actors.learner import fit  # noqa: E402
from zray.training.shards import ShardBatches  # noqa: E402
from zray.config import LearnerConfig  # noqa: E402


class _Shard:
    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns

    def iter_batches(self, batch_size: int, batch_format: str):
        assert batch_format == "numpy"
        n = len(next(iter(self.columns.values())))
        for start in range(0, n, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.columns.items()}


def _lengths(columns: dict[str, np.ndarray]) -> np.ndarray:
    return columns["length"]


def _shard(num_rows: int = 100, seed: int = 0) -> _Shard:
    rng = np.random.default_rng(seed)
    return _Shard({"id": np.arange(num_rows), "length": rng.integers(10, 200, size=num_rows)})


def _epoch(batches: ShardBatches, epoch: int) -> list[dict[str, np.ndarray]]:
    return [batches[epoch * batches.batches_per_epoch + i] for i in range(batches.batches_per_epoch)]


def test_grouping_sorts_each_window_and_keeps_its_rows():
    plain = ShardBatches(_shard(), LearnerConfig(micro_batch_size=4, seed=3), rank=0)
    grouped = ShardBatches(_shard(), LearnerConfig(micro_batch_size=4, seed=3, length_window=5), rank=0,
                           lengths_of=_lengths)
    assert grouped.batches_per_epoch == plain.batches_per_epoch == 25  # 5 windows of 5 micro batches
    for epoch in (0, 1):
        p, g = _epoch(plain, epoch), _epoch(grouped, epoch)
        for w in range(0, 25, 5):
            window = [b for b in g[w:w + 5]]
            # the same rows as the plain order's window, regrouped
            assert sorted(np.concatenate([b["id"] for b in window])) == \
                sorted(np.concatenate([b["id"] for b in p[w:w + 5]]))
            # micro batches are consecutive runs of the window's sorted lengths
            spans = sorted((int(b["length"].min()), int(b["length"].max())) for b in window)
            assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
    padded = lambda batches: np.mean([b["length"].max() for b in batches])  # noqa: E731
    assert padded(_epoch(grouped, 0)) < 0.85 * padded(_epoch(plain, 0))
    # the micro batches of a window are not always taken shortest first
    firsts = [int(np.argsort([b["length"].max() for b in _epoch(grouped, 0)[w:w + 5]])[0]) for w in range(0, 25, 5)]
    assert set(firsts) != {0}


def test_ranks_take_micro_batches_of_the_same_length_rank():
    cfg = LearnerConfig(micro_batch_size=4, seed=3, length_window=5)
    ranks = [ShardBatches(_shard(seed=r), cfg, rank=r, lengths_of=_lengths) for r in (0, 1)]
    for w in range(0, 25, 5):
        order = [np.argsort([b["length"].mean() for b in _epoch(r, 0)[w:w + 5]]).tolist() for r in ranks]
        assert order[0] == order[1]


def test_order_is_a_pure_function_of_the_index():
    cfg = LearnerConfig(micro_batch_size=4, seed=1, length_window=3)
    a = ShardBatches(_shard(num_rows=30), cfg, rank=1, lengths_of=_lengths)
    b = ShardBatches(_shard(num_rows=30), cfg, rank=1, lengths_of=_lengths)
    assert a.batches_per_epoch == 7  # two windows of 3 and a last one of 1; rows 28-29 sit out
    indices = [15, 2, 9, 20, 0]  # b jumps around, as a resumed worker starts mid-run
    for i in indices:
        assert np.array_equal(a[i]["id"], b[i]["id"])
    first = np.concatenate([x["id"] for x in _epoch(a, 0)])
    assert len(set(first.tolist())) == 28


def test_grouping_without_lengths_is_refused():
    cfg = LearnerConfig(micro_batch_size=4, length_window=2)
    with pytest.raises(ValueError, match="length_window=2"):
        ShardBatches(_shard(), cfg, rank=0)
    with pytest.raises(ValueError, match=r"shape \(3,\) for 100 rows"):
        ShardBatches(_shard(), cfg, rank=0, lengths_of=lambda columns: np.ones(3))
    with pytest.raises(ValueError, match="LearnerConfig.length_window"):
        LearnerConfig(length_window=-1)


def test_fit_refuses_grouping_for_a_task_without_row_lengths(tmp_path):
    class NoLengths:
        name = "plain"

        def build_model(self): ...
        def collate(self, rows): ...
        def loss(self, model, batch): ...
        def save_pretrained(self, model, out_dir): ...
        def load_pretrained(self, model, ckpt_dir): ...

    with pytest.raises(ValueError, match="length_window=4 is not allowed for task 'plain'"):
        fit(NoLengths(), LearnerConfig(length_window=4), datasets={"train": object()}, storage_path=tmp_path,
            name="x")


def test_budget_end_step_spends_the_rest_of_the_budget_at_the_rate_so_far():
    from zray.training.runs import budget_end_step

    # 100 steps in 20 s (5 steps/s) with 80 s left: 400 more
    assert budget_end_step(step=100, first_step=0, elapsed_s=20.0, budget_s=100.0, max_steps=10_000) == 500
    # a resumed process counts only its own steps: 50 steps in 10 s since step 1,000
    assert budget_end_step(step=1050, first_step=1000, elapsed_s=10.0, budget_s=30.0, max_steps=10_000) == 1150
    assert budget_end_step(step=100, first_step=0, elapsed_s=20.0, budget_s=100.0, max_steps=300) == 300  # the cap
    assert budget_end_step(step=100, first_step=0, elapsed_s=120.0, budget_s=100.0, max_steps=300) == 100  # spent


def test_moving_the_schedule_end_changes_the_lr_and_is_checkpointed():
    import types

    import torch

    from zray.training.engine import TrainEngine, build_optimizer

    cfg = LearnerConfig(lr=1.0, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.0, max_steps=100)
    engine = types.SimpleNamespace(scheduler=build_optimizer(torch.nn.Linear(2, 2), cfg)[1])
    for _ in range(50):
        engine.scheduler.optimizer.step()
        engine.scheduler.step()
    assert engine.scheduler.get_last_lr()[0] == pytest.approx(0.5)  # half way through the cosine
    TrainEngine.set_schedule_steps(engine, 200)
    engine.scheduler.optimizer.step()
    engine.scheduler.step()
    assert engine.scheduler.get_last_lr()[0] == pytest.approx(0.5 * (1 + np.cos(np.pi * 51 / 200)))
    restored = build_optimizer(torch.nn.Linear(2, 2), cfg)[1]
    restored.load_state_dict(engine.scheduler.state_dict())
    assert restored.lr_lambdas[0].total_steps == 200
