"""OPD as an online task (`zray.tasks.opd`): weight sync, teacher log-probs joined to the student's rollout, the loss.

No Ray, no vLLM: the student's rollouts are built by the engines' own vLLM-free assembly (the `synthetic_rollout`
fixture); the teacher is a stand-in that returns chosen log-probs of the same tokens.
"""

import dataclasses
import json
import pickle

import pytest
import torch

from jobs.recipes import tiny_cpu
from zray.checksum import weights_checksum
from zray.config import WorldConfig
from zray.data.distill_inputs import distill_inputs
from zray.models.vlm import cached_processor
from zray.tasks.gdso import ROLLOUT_METRICS
from zray.tasks.opd import OPDTask
from zray.types import WeightVersionError


class FakeStudentEngines:
    def __init__(self, model_dir, make_rollout, stale=False):
        self.model_dir, self.make_rollout, self.stale = model_dir, make_rollout, stale
        self.version, self.loads, self.last = 0, [], None

    def __getstate__(self):
        return {**self.__dict__, "make_rollout": None}

    verify_columns = 0  # full checksums

    def load_weights(self, weights, *, version, checksum):
        assert weights_checksum(weights) == checksum
        self.loads.append(version)
        self.version = version

    def generate(self, requests, *, group_size, max_reasoning_tokens, temperature, seed):
        assert all(r.reasoning is None for r in requests)
        self.last = self.make_rollout(cached_processor(self.model_dir), requests, group_size, max_reasoning_tokens,
                                      seed, temperature=temperature, version=self.version - self.stale,
                                      token_logprob=-2.0)
        return self.last


class FakeTeacher:
    """Scores every token at `shift` above the student's sampling log-prob (the prefix at -1)."""

    def __init__(self, student, shift):
        self.student, self.shift, self.calls = student, shift, 0

    def token_logprobs(self, sequences):
        self.calls += 1
        ro = self.student.last
        out = []
        for b, seq in enumerate(sequences):
            n, g = divmod(b, ro.group_size)
            length = len(seq.response_ids)
            assert list(seq.response_ids) == ro.response_ids_NGT[n, g, :length].tolist()
            mask = ro.policy_mask_NGT[n, g, :length]
            out.append(torch.where(mask, ro.old_logprobs_NGT[n, g, :length] + self.shift, torch.tensor(-1.0)))
        return out


@dataclasses.dataclass
class FakeEngine:
    model: torch.nn.Module
    rank: int = 0
    zero_stage: int = 0

    def full_state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


@pytest.fixture(scope="module")
def rows():
    world = WorldConfig(num_train_prompts=8, num_test_prompts=4, num_heldout_prompts=4, candidates_per_prompt=2,
                        image_size=32)
    return distill_inputs(world, 1, ("alignment", "realism"), progress=False).to_pydict()  # 4 inputs


def _task(tiny_zoo, synthetic_rollout, shift, **kwargs):
    path = str(tiny_zoo["student"]["path"])
    cfg = dataclasses.replace(tiny_cpu().train_student, opd_samples=2, max_reasoning_tokens=5)
    student = FakeStudentEngines(path, synthetic_rollout, **kwargs)
    return OPDTask(model_dir=path, cfg=cfg, rollouts=student, teacher=FakeTeacher(student, shift), seed=1)


def _step(task, rows, rollout_index=0):
    model = task.build_model()
    task.before_rollout(FakeEngine(model), rollout_index=rollout_index)
    batch = task.collate(rows)
    model.zero_grad(set_to_none=True)
    loss, metrics = task.loss(model, batch)
    loss.backward()
    return model, batch, loss, metrics


def test_zero_gradient_when_the_teacher_agrees_with_the_student(tiny_zoo, synthetic_rollout, rows):
    task = _task(tiny_zoo, synthetic_rollout, shift=0.0)
    model, batch, loss, metrics = _step(task, rows)
    assert task.rollouts.loads == [1] and metrics["weights_version"] == 1.0  # synced before the rollout
    assert float(loss.detach()) == 0.0 and metrics["reverse_kl"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert batch["teacher_logp"].shape == batch["old_logp"].shape == (8, batch["resp_ids"].shape[1])
    assert (batch["teacher_logp"][~batch["policy_mask"]] == 0).all()  # the forced prefix and padding carry nothing
    assert {"rollout_s", "teacher_s", "sync_s", "response_tokens"} <= set(batch[ROLLOUT_METRICS])


def test_a_better_scoring_teacher_pushes_the_sampled_tokens_up(tiny_zoo, synthetic_rollout, rows):
    task = _task(tiny_zoo, synthetic_rollout, shift=0.5)  # A_t = +0.5 on every sampled token
    model, batch, loss, metrics = _step(task, rows)
    from zray.models.teacher_forcing import forced_logprobs
    from zray.scores import score_token_ids

    with torch.no_grad():
        logp, _ = forced_logprobs(model, batch, score_token_ids(task.processor))
    mask = batch["policy_mask"]
    expected = -(0.5 * (logp * mask).sum(-1) / mask.sum(-1)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert metrics["advantage_mean"] == pytest.approx(0.5, abs=1e-6)
    with torch.no_grad():  # a small step along -grad raises the sampled tokens' log-probs
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
        after, _ = forced_logprobs(model, batch, score_token_ids(task.processor))
    assert float((after * mask).sum()) > float((logp * mask).sum())


def test_a_rollout_from_other_weights_is_refused(tiny_zoo, synthetic_rollout, rows):
    task = _task(tiny_zoo, synthetic_rollout, shift=0.0, stale=True)
    model = task.build_model()
    task.before_rollout(FakeEngine(model), rollout_index=0)
    with pytest.raises(WeightVersionError, match="synced version 1"):
        task.collate(rows)
    assert task.teacher.calls == 0


def test_pickles_without_worker_state_and_saves_a_reasoning_scorer(tiny_zoo, synthetic_rollout, tmp_path):
    task = _task(tiny_zoo, synthetic_rollout, shift=0.0)
    model = task.build_model()
    assert pickle.loads(pickle.dumps(task)).state is None
    task.save_pretrained(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "zray_scoring.json").read_text()) == {"form": "reasoning", "method": "opd"}
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
