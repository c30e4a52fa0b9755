"""The teacher's vLLM engine: score distributions and rollouts match transformers' teacher forcing."""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from zray.models.vlm import load_vlm, score_distributions_hf
from zray.rubric import ScoreRequest

pytestmark = pytest.mark.slow


def _images():
    rng = np.random.RandomState(0)
    return [Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 70, 230)),
            Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def requests_():
    out = []
    for image in _images():
        out.append(ScoreRequest("a red circle on a white background", image, "alignment"))  # student form
        out.append(ScoreRequest("two blue squares", image, "realism", "I see two blue squares; slight blur."))
    return out


def test_vllm_matches_transformers(teacher_engine, sharp_teacher_dir, requests_):
    q_vllm = torch.stack(teacher_engine.score_distributions(requests_))
    model, processor = load_vlm(sharp_teacher_dir)
    with torch.no_grad():
        q_hf = score_distributions_hf(model, processor, requests_)
    diff = (q_vllm - q_hf).abs().max().item()
    # log space too: a sharpened tiny teacher can be nearly one-hot, and then q alone says little
    log_vllm, log_hf = q_vllm.clamp_min(1e-30).log(), q_hf.clamp_min(1e-30).log()
    log_diff = (log_vllm - log_hf)[q_hf > 1e-8].abs().max().item()
    print(f"max |q_vllm - q_hf| = {diff:.2e}, max |log q_vllm - log q_hf| (q > 1e-8) = {log_diff:.2e}; "
          f"vLLM start {teacher_engine.start_s:.1f} s")
    assert diff < 1e-3 and log_diff < 1e-2
    # meaningful: clearly non-uniform, and different per image / form
    entropy = -(q_hf * q_hf.clamp_min(1e-12).log()).sum(-1)
    assert entropy.max() < math.log(9) - 0.5
    assert (log_hf[0] - log_hf[2]).abs().max() > 0.1 and (log_hf[0] - log_hf[1]).abs().max() > 0.1


def test_score_distributions_accept_tuples(teacher_engine, requests_):
    r = requests_[1]
    q = teacher_engine.score_distributions([(r.prompt, r.image, r.dimension, r.reasoning)])[0]
    assert torch.allclose(q, teacher_engine.score_distributions([r])[0])
    with pytest.raises(ValueError, match="dimension='beauty'"):
        teacher_engine.score_distributions([("a red circle", r.image, "beauty")])


def test_generate_texts_smoke(teacher_engine, requests_):
    out = teacher_engine.generate_texts(requests_[:2], max_tokens=8, n=2, temperature=1.0)
    assert len(out) == 2 and all(len(samples) == 2 and all(isinstance(s, str) for s in samples) for samples in out)


@pytest.fixture(scope="module")
def rollout_requests(requests_):
    return [ScoreRequest(r.prompt, r.image, r.dimension) for r in requests_[::2][:2]]


@pytest.fixture(scope="module")
def rollouts(teacher_engine, rollout_requests):
    return teacher_engine.generate(rollout_requests, group_size=3, max_reasoning_tokens=6, temperature=1.0, seed=5)


def test_rollouts_are_what_the_learner_teacher_forces(rollouts, rollout_requests, sharp_teacher_dir, teacher_force,
                                                     teacher_engine):
    """Token ids, log-probs (pi_old) and q of the batch equal transformers' on the same ids and pixels."""
    b = rollouts.validate()
    assert (b.num_inputs, b.group_size) == (2, 3) and b.weights_version == teacher_engine.version()
    model, processor = load_vlm(sharp_teacher_dir)
    logprobs_hf, q_hf = teacher_force(model, processor, b, rollout_requests)
    lp_diff = (logprobs_hf - b.old_logprobs_NGT).abs().max().item()
    q_diff = (q_hf - b.q_NGK).abs().max().item()
    print(f"max |logp_vllm - logp_hf| = {lp_diff:.2e}, max |q_vllm - q_hf| = {q_diff:.2e}")
    assert lp_diff < 1e-4 and q_diff < 1e-4


def test_malformed_rollouts_are_kept_and_flagged(rollouts, teacher_engine):
    """The sharpened tiny teacher never writes "Score:": every sample runs to the budget, the prefix is forced."""
    b = rollouts
    prefix = teacher_engine.tokenizer.encode(" Score: ", add_special_tokens=False)
    assert b.num_malformed() == 6 and not b.format_ok_NG.any() and (b.finish_NG == 1).all()
    assert (b.num_reasoning_NG == 6).all()
    for n in range(2):
        for g in range(3):
            r = int(b.num_reasoning_NG[n, g])
            response = b.response_ids_NGT[n, g, : int(b.response_lens_NG[n, g])].tolist()
            assert response[r: r + len(prefix)] == prefix and response[-1] in teacher_engine.score_ids
            assert b.policy_mask_NGT[n, g, r: r + len(prefix)].sum() == 0


def test_rollouts_are_seeded(teacher_engine, rollout_requests, rollouts):
    """Same seed -> same samples; a split batch with the right offset -> the same samples as one call."""
    again = teacher_engine.generate(rollout_requests, group_size=3, max_reasoning_tokens=6, seed=5)
    assert torch.equal(again.response_ids_NGT, rollouts.response_ids_NGT)
    second = teacher_engine.generate(rollout_requests[1:], group_size=3, max_reasoning_tokens=6, seed=5,
                                     request_offset=1)
    assert second.sequence(0, 2) == rollouts.sequence(1, 2)


def test_rollout_arguments_are_validated(teacher_engine, rollout_requests):
    with pytest.raises(ValueError, match="group_size=0"):
        teacher_engine.generate(rollout_requests, group_size=0, max_reasoning_tokens=4)
    with pytest.raises(ValueError, match="max_reasoning_tokens=0"):
        teacher_engine.generate(rollout_requests, group_size=2, max_reasoning_tokens=0)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_skipped_set_num_threads_warning_is_filtered(teacher_engine, rollout_requests):
    """vLLM's in-process CPU worker turns torch.set_num_threads into a warning that its renderer triggers twice per
    multimodal request (each prompt of both rollout calls): exactly that message is dropped, nothing else."""
    from actors.teacher_engine.engine import CPU_WORKER_LOGGER, SKIPPED_SET_NUM_THREADS, SkippedSetNumThreadsFilter

    records, worker = _Records(), logging.getLogger(CPU_WORKER_LOGGER)
    ours = [f for f in worker.filters if isinstance(f, SkippedSetNumThreadsFilter)]
    assert len(ours) == 1
    logging.getLogger("vllm").addHandler(records)
    try:
        teacher_engine.generate(rollout_requests, group_size=2, max_reasoning_tokens=4, seed=0)
        torch.set_num_threads(torch.get_num_threads())  # replaced by vLLM's CPU worker in this process
        worker.warning("another warning of the CPU worker")
        assert SKIPPED_SET_NUM_THREADS not in records.messages
        assert "another warning of the CPU worker" in records.messages
        worker.removeFilter(ours[0])  # without the filter, the same call reaches the log
        torch.set_num_threads(torch.get_num_threads())
        assert records.messages.count(SKIPPED_SET_NUM_THREADS) == 1
    finally:
        logging.getLogger("vllm").removeHandler(records)
        if ours[0] not in worker.filters:
            worker.addFilter(ours[0])


def test_token_logprobs_of_a_rollout_are_its_own_sampling_logprobs(teacher_engine, rollouts, rollout_requests):
    """OPD's teacher side: teacher-forcing a rollout's tokens through the engine gives, on every sampled token, the
    log-prob it was sampled with (the same model); the forced score prefix gets its log-prob too."""
    from zray.types import ForcedSequence

    sequences = ForcedSequence.from_rollout(rollouts, [r.image for r in rollout_requests])
    logps = teacher_engine.token_logprobs(sequences)
    assert len(logps) == rollouts.num_inputs * rollouts.group_size
    for b, logp in enumerate(logps):
        n, g = divmod(b, rollouts.group_size)
        length = int(rollouts.response_lens_NG[n, g])
        mask = rollouts.policy_mask_NGT[n, g, :length]
        assert logp.shape == (length,) and torch.isfinite(logp).all() and (logp <= 0).all()
        torch.testing.assert_close(logp[mask], rollouts.old_logprobs_NGT[n, g, :length][mask], atol=1e-4, rtol=0)


def test_token_logprobs_refuse_a_prompt_that_expands_differently(teacher_engine, rollouts, rollout_requests):
    from zray.types import ForcedSequence

    seq = ForcedSequence.from_rollout(rollouts, [r.image for r in rollout_requests])[0]
    small = rollout_requests[0].image.resize((32, 32))  # fewer image tokens than the prompt ids hold
    with pytest.raises(ValueError, match="see the image differently"):
        teacher_engine.token_logprobs([ForcedSequence(seq.prompt_ids, seq.response_ids, small)])
