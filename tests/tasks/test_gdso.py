"""The GDSO / GRPO online task (`zray.tasks.gdso`): method coefficients, worker state, checkpointed pi_ref.

No Ray, no vLLM: the task runs on the tiny teacher with an in-process `RolloutSource` whose rollouts are built by
the engines' own vLLM-free assembly (the `synthetic_rollout` fixture of tests/conftest.py), and a stand-in for the
learner's engine (rank, ZeRO stage, full state dict).
"""

import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.recipes import tiny_cpu
from zray.checksum import checksum_like
from zray.models.teacher_forcing import PolicyModel
from zray.models.vlm import cached_processor
from zray.tasks.gdso import REF_PREFIX, ROLLOUT_METRICS, GDSOTask
from zray.types import WeightVersionError


def test_grpo_is_gdso_without_pairwise_reward_and_direct_terms():
    cfg = tiny_cpu().train_teacher
    gdso = GDSOTask(model_dir="x", cfg=cfg, rollouts=object())
    grpo = GDSOTask(model_dir="x", cfg=dataclasses.replace(cfg, method="grpo"), rollouts=object())
    assert gdso.coefficients == {"lam_pt": 1.0, "lam_pw": 1.0, "alpha_pt": 0.5, "alpha_pw": 0.5}
    assert grpo.coefficients == {"lam_pt": 1.0, "lam_pw": 0.0, "alpha_pt": 0.0, "alpha_pw": 0.0}
    with pytest.raises(ValueError, match="method='sft'"):
        GDSOTask(model_dir="x", cfg=dataclasses.replace(cfg, method="sft"), rollouts=object())


# ------------------------------------------------------------------------------------------ fakes


class FakeRollouts:
    """An in-process RolloutSource: records weight loads, serves the last version it was sent."""

    def __init__(self, model_dir: str, make_rollout, stale: bool = False) -> None:
        self.model_dir, self.make_rollout, self.stale = model_dir, make_rollout, stale
        self.loads: list[tuple[int, str, set[torch.dtype]]] = []
        self.version = 0

    def __getstate__(self):  # a real source ships actor handles; this one ships no rollout builder
        return {**self.__dict__, "make_rollout": None}

    verify_columns = 4  # sampled checksums, as the dev and full recipes' engines verify

    def load_weights(self, weights, *, version, checksum):
        assert checksum.startswith(f"cols4-seed{version}-") and checksum_like(weights, checksum) == checksum
        self.loads.append((version, checksum, {v.dtype for v in weights.values()}))
        self.version = version

    def generate(self, requests, *, group_size, max_reasoning_tokens, temperature, seed):
        version = self.version - 1 if self.stale else self.version
        return self.make_rollout(cached_processor(self.model_dir), requests, group_size, max_reasoning_tokens, seed,
                                 temperature=temperature, version=version, token_logprob=-2.0)


@dataclasses.dataclass
class FakeEngine:
    """What `before_rollout` uses of the learner's TrainEngine."""

    model: torch.nn.Module
    rank: int = 0
    zero_stage: int = 0

    def full_state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pair_rows(num_pairs: int = 2) -> dict:
    return {"prompt": np.array(["a red circle", "two blue stars"][:num_pairs]),
            "winner_image": [_png(2 * p) for p in range(num_pairs)],
            "loser_image": [_png(2 * p + 1) for p in range(num_pairs)],
            "dimension": np.array(["alignment", "realism"][:num_pairs]),
            "winner_label": np.array([4.0, 3.5][:num_pairs]), "loser_label": np.array([1.5, 2.0][:num_pairs])}


def _nudge(model: torch.nn.Module, by: float = 0.01) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ref(task: GDSOTask) -> dict:
    return task.policy.ref.state_dict()


@pytest.fixture
def make_task(tiny_zoo, synthetic_rollout):
    path = str(tiny_zoo["teacher"]["path"])
    cfg = dataclasses.replace(tiny_cpu().train_teacher, inner_steps=3, group_size=2, max_reasoning_tokens=5)

    def make(**kwargs):
        return GDSOTask(model_dir=path, cfg=cfg, rollouts=FakeRollouts(path, synthetic_rollout, **kwargs), seed=1)

    return make


# ------------------------------------------------------------------------------------------ tests


def test_pickling_after_build_model_carries_no_policy_state(make_task):
    task = make_task()
    model = task.build_model()
    assert isinstance(model, PolicyModel) and isinstance(task.policy.ref, PolicyModel)
    data = pickle.dumps(task)
    clone = pickle.loads(data)
    assert clone.policy is None and task.policy is not None  # the worker keeps its own
    weights_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert len(data) < weights_bytes / 10, (len(data), weights_bytes)  # no pi_ref inside
    with pytest.raises(RuntimeError, match="build_model"):
        clone.task_state()


def test_before_rollout_resets_pi_ref_at_outer_iterations_only(make_task):
    task = make_task()
    model = task.build_model()
    engine = FakeEngine(model)
    assert task.task_state() == {}  # no pi_ref of this run before the first rollout
    _nudge(model)  # pi_ref built from the checkpoint; the policy moved on
    for i in range(7):  # inner_steps = 3: resets at rollouts 0, 3, 6
        before = {k: v.clone() for k, v in _ref(task).items()}
        task.before_rollout(engine, rollout_index=i)
        if i % 3 == 0:
            assert _same(_ref(task), model.state_dict()), i
        else:
            assert _same(_ref(task), before) and not _same(_ref(task), model.state_dict()), i
        version, checksum, dtypes = task.rollouts.loads[-1]
        assert version == i + 1 and task.policy.version == i + 1 and dtypes == {torch.float32}
        assert checksum == checksum_like(model.state_dict(), checksum)  # the engines get pi_theta under HF names
        _nudge(model)
    state = task.task_state()
    assert set(state) == {REF_PREFIX + k for k in _ref(task)}
    assert all(torch.equal(state[REF_PREFIX + k], v) for k, v in _ref(task).items())


def test_resumed_task_keeps_pi_ref_in_the_middle_of_an_outer_iteration(make_task, tmp_path):
    from safetensors.torch import load_file, save_file

    task = make_task()
    model = task.build_model()
    engine = FakeEngine(model)
    task.before_rollout(engine, rollout_index=0)  # outer iteration start: pi_ref <- pi_theta
    _nudge(model)
    task.before_rollout(engine, rollout_index=1)
    saved_ref = {k: v.clone() for k, v in _ref(task).items()}
    # the learner's checkpoint: task_state.safetensors (cloned, as actors/learner/worker_loop.py writes it)
    save_file({k: v.clone().contiguous() for k, v in task.task_state().items()}, str(tmp_path / "state.safetensors"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = pickle.loads(pickle.dumps(task))  # a new worker gets the shipped task
    fresh.rollouts = FakeRollouts(task.model_dir, task.rollouts.make_rollout)
    resumed = fresh.build_model()
    resumed.load_state_dict(weights)  # engine.load restores pi_theta
    fresh.load_task_state(load_file(str(tmp_path / "state.safetensors")))
    assert _same(_ref(fresh), saved_ref)
    _nudge(resumed)
    fresh.before_rollout(FakeEngine(resumed), rollout_index=2)  # mid-iteration: no reset
    assert _same(_ref(fresh), saved_ref) and not _same(_ref(fresh), resumed.state_dict())
    assert fresh.rollouts.loads[-1][0] == 3
    fresh.before_rollout(FakeEngine(resumed), rollout_index=3)  # the next outer iteration resets
    assert _same(_ref(fresh), resumed.state_dict())


def test_empty_task_state_leaves_the_reset_to_the_first_rollout(make_task):
    task = make_task()
    model = task.build_model()
    task.load_task_state({})
    _nudge(model)
    task.before_rollout(FakeEngine(model), rollout_index=1)  # resumed mid-iteration from a stateless checkpoint
    assert _same(_ref(task), model.state_dict())  # pi_ref must hold a policy of this run


def test_loss_reports_the_rollout_metrics_by_name(make_task):
    task = make_task()
    model = task.build_model()
    task.before_rollout(FakeEngine(model), rollout_index=0)
    batch = task.collate(_pair_rows(2))
    rollout = batch[ROLLOUT_METRICS]
    assert {"reward_mean", "reward_std", "adv_abs_mean", "format_fail_frac", "response_tokens", "rollout_gap",
            "rollout_s", "ref_s", "sync_s", "weights_version"} <= set(rollout)
    assert rollout["weights_version"] == 1.0 and rollout["format_fail_frac"] == 0.0
    assert batch["input_ids"].shape[0] == 2 * 2 * 2  # pairs x sides x G
    loss, metrics = task.loss(model, batch)
    assert torch.isfinite(loss)
    assert {k: metrics[k] for k in rollout} == rollout
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_collate_rejects_a_rollout_of_another_weights_version(make_task):
    task = make_task(stale=True)
    model = task.build_model()
    task.before_rollout(FakeEngine(model), rollout_index=0)
    with pytest.raises(WeightVersionError, match="weights version 0, but the learner synced version 1"):
        task.collate(_pair_rows(1))


def test_save_and_load_pretrained_round_trip_the_vlm(make_task, tmp_path):
    from zray.models.vlm import load_vlm

    task = make_task()
    model = task.build_model()
    _nudge(model)
    task.save_pretrained(model, tmp_path / "hf")
    loaded, _ = load_vlm(tmp_path / "hf")  # Hugging Face format, without zray's wrapper
    assert _same(loaded.state_dict(), model.state_dict())
    other = task.build_model()
    task.load_pretrained(other, tmp_path / "hf")
    assert _same(other.state_dict(), model.state_dict())
