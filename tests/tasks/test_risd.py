"""RISD (`zray.tasks.risd`): teacher targets collected in resumable chunks, and the student's one-token task.

No Ray, no vLLM: the teacher is an in-process source whose rollouts are built by the engines' own vLLM-free assembly
(the `synthetic_rollout` fixture of tests/conftest.py); the student is the tiny zoo's.
"""

import json

import numpy as np
import pytest
import torch

from zray.config import WorldConfig
from zray.data.distill_inputs import distill_inputs
from zray.models.vlm import cached_processor, load_vlm, score_distributions_hf
from zray.rubric import NUM_BINS
from zray.tasks.risd import RISDTask, collect_teacher_targets, input_requests

WORLD = WorldConfig(num_train_prompts=8, num_test_prompts=4, num_heldout_prompts=4, candidates_per_prompt=2,
                    image_size=32)


class FakeTeacher:
    """A TeacherSource: synthetic rollouts of the tiny teacher's processor; counts the inputs it was asked for."""

    def __init__(self, model_dir, make_rollout, fail_after: int | None = None):
        self.model_dir, self.make_rollout, self.fail_after = model_dir, make_rollout, fail_after
        self.calls: list[int] = []

    def generate(self, requests, *, group_size, max_reasoning_tokens, temperature, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("engine died")
        self.calls.append(len(requests))
        return self.make_rollout(cached_processor(self.model_dir), requests, group_size, max_reasoning_tokens, seed,
                                 temperature=temperature, version=3)


@pytest.fixture(scope="module")
def inputs():
    return distill_inputs(WORLD, 3, ("alignment", "realism"), progress=False)  # 12 rows


def _collect(teacher, inputs, out_dir, **kwargs):
    settings = dict(teacher_samples=2, max_reasoning_tokens=4, temperature=1.0, seed=0, chunk_size=5,
                    identity={"teacher": "t"})
    return collect_teacher_targets(teacher, inputs, out_dir=out_dir, **(settings | kwargs))


def test_targets_hold_n_distributions_per_input_and_resume_after_a_failure(tiny_zoo, synthetic_rollout, inputs,
                                                                           tmp_path):
    teacher_dir = tiny_zoo["teacher"]["path"]
    dying = FakeTeacher(teacher_dir, synthetic_rollout, fail_after=1)
    with pytest.raises(RuntimeError, match="engine died"):
        _collect(dying, inputs, tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").glob("part-*")) == ["part-00000.parquet"]  # a whole chunk kept

    teacher = FakeTeacher(teacher_dir, synthetic_rollout)
    targets = _collect(teacher, inputs, tmp_path / "t")
    assert teacher.calls == [5, 2]  # only the missing chunks (rows 5-9, 10-11)
    assert targets.num_rows == inputs.num_rows
    assert targets.select(inputs.column_names).equals(inputs)  # inputs kept in order, joined with their targets
    q = np.array(targets.column("q_teacher").to_pylist())
    assert q.shape == (12, 2 * NUM_BINS)
    np.testing.assert_allclose(q.reshape(12, 2, NUM_BINS).sum(-1), 1.0, atol=1e-6)
    assert set(targets.column("teacher_version").to_pylist()) == {3}
    assert all(1 <= mu <= 5 for mu in targets.column("teacher_mu").to_pylist())

    again = FakeTeacher(teacher_dir, synthetic_rollout)
    assert _collect(again, inputs, tmp_path / "t").equals(targets) and again.calls == []  # finished: reused
    with pytest.raises(ValueError, match="other settings"):  # another teacher's targets are never mixed in
        _collect(again, inputs, tmp_path / "t", identity={"teacher": "other"})
    with pytest.raises(ValueError, match="other settings"):
        _collect(again, inputs, tmp_path / "t", teacher_samples=1)
    assert json.loads((tmp_path / "t" / "targets.json").read_text())["identity"] == {"teacher": "t"}


def _rows(inputs, q_BnK):
    cols = inputs.slice(0, len(q_BnK)).to_pydict()
    cols["q_teacher"] = [row.reshape(-1).tolist() for row in q_BnK]
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


def test_loss_is_the_kl_from_the_mean_teacher_q_to_the_students_one_token_q(tiny_zoo, inputs):
    student_dir = tiny_zoo["student"]["path"]
    task = RISDTask(model_dir=student_dir)
    q_BnK = torch.softmax(torch.randn(4, 3, NUM_BINS, generator=torch.Generator().manual_seed(0)), -1).numpy()
    rows = _rows(inputs, q_BnK)
    batch = task.collate(rows)
    assert batch["q_teacher"].shape == (4, 3, NUM_BINS) and batch["q_teacher"].dtype == torch.float32
    model = task.build_model().eval()
    loss, metrics = task.loss(model, batch)

    ref_model, processor = load_vlm(student_dir)  # the student form through the evaluation path
    with torch.no_grad():
        q_S = score_distributions_hf(ref_model, processor, input_requests(rows)).double()
    q_T = torch.from_numpy(q_BnK).double().mean(1)
    expected = (q_T * (q_T.log() - q_S.log())).sum(-1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-6)


def test_student_moves_toward_the_teacher_and_round_trips(tiny_zoo, inputs, tmp_path, plain_then_ddp):
    task = RISDTask(model_dir=tiny_zoo["student"]["path"])
    q_BnK = np.zeros((4, 1, NUM_BINS), dtype=np.float32)
    q_BnK[:, 0, 8] = 1.0  # the teacher is sure: 5.0
    batch = task.collate(_rows(inputs, q_BnK))
    model, (loss, metrics, grads), wrapped = plain_then_ddp(task, batch, tmp_path)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for ddp_loss, _, _ in wrapped:
        assert ddp_loss == pytest.approx(loss, rel=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = float(task.loss(model, batch)[0])
    for _ in range(3):
        optimizer.zero_grad()
        task.loss(model, batch)[0].backward()
        optimizer.step()
    after, metrics = task.loss(model, batch)
    assert float(after) < before and metrics["mu_student"] > 3.0
    task.save_pretrained(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "zray_scoring.json").read_text()) == {"form": "direct", "method": "risd"}
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_collate_rejects_targets_that_are_not_whole_distributions(tiny_zoo, inputs):
    task = RISDTask(model_dir=tiny_zoo["student"]["path"])
    rows = _rows(inputs, np.full((2, 1, NUM_BINS), 1 / NUM_BINS))
    rows["q_teacher"] = np.array([r[:-1] for r in rows["q_teacher"]], dtype=object)
    with pytest.raises(ValueError, match=r"8 values per row: expected n \* 9"):
        task.collate(rows)
