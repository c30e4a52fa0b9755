"""Test-session environment: offline hub, tiny vLLM KV cache, in-process vLLM engines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ------------------------------------------------------------------ tiny model zoo (built once per session)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zoo_config():
    """The zoo the model tests build: a Qwen2.5-VL teacher, a smaller Qwen3-VL student, a tiny Z-Image."""
    from zray.config import GeneratorConfig, RunConfig, VLMConfig

    return RunConfig(
        teacher=VLMConfig(arch="qwen2_5_vl", hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64,
                          num_layers=2, intermediate_size=256, seed=1),
        student=VLMConfig(arch="qwen3_vl", hidden_size=64, num_heads=1, num_kv_heads=1, head_dim=64,
                          num_layers=1, intermediate_size=128, seed=2),
        generator=GeneratorConfig(seed=3),
    )


@pytest.fixture(scope="session")
def tiny_zoo(tiny_zoo_config, tmp_path_factory):
    """{role: {"path", "num_params", "build_s", "built"}} for teacher, student, generator."""
    from zray.models.tiny import build_zoo

    return build_zoo(tiny_zoo_config, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def sharp_teacher_dir(tiny_zoo, tmp_path_factory):
    """The tiny teacher with its score-token rows of lm_head sharpened, so that q is clearly non-uniform."""
    from zray.models.tiny import sharpen_score_head
    from zray.models.vlm import load_vlm
    from zray.scores import score_token_ids

    model, processor = load_vlm(tiny_zoo["teacher"]["path"])
    # q max 0.45-0.99 over the engine tests' requests (scale 2 left one at entropy 1.77 of log 9 = 2.20)
    sharpen_score_head(model, score_token_ids(processor), scale=3.0, seed=0)
    out = tmp_path_factory.mktemp("sharp_teacher")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher_engine(sharp_teacher_dir):
    """One vLLM engine per test session, on the sharpened tiny teacher (float32, in-process)."""
    from actors.teacher_engine import TeacherEngine
    from zray.config import VLLMConfig

    engine = TeacherEngine(sharp_teacher_dir, VLLMConfig(max_model_len=1024))
    yield engine
    engine.shutdown()


# ------------------------------------------------------------------ teacher forcing through transformers



def _teacher_force(model, processor, batch, requests):
    """(old-logprob-like log-probs on policy tokens, q at the score position) recomputed by transformers.

    Feeds exactly `batch.sequence(n, g)` with the processor's pixel values for request n, as the learner will,
    and checks that the batch's prompt ids are the processor's. Returns (logprobs_NGT, q_NGK), zeros off-policy.
    """
    import torch

    from zray.rubric import render_generation_prompt
    from zray.scores import score_distribution, score_token_ids

    score_ids = score_token_ids(processor)
    logprobs = torch.zeros(batch.old_logprobs_NGT.shape)
    q = torch.zeros(batch.q_NGK.shape)
    for n, r in enumerate(requests):
        text = render_generation_prompt(processor, r.prompt, r.dimension, reasoning=True)
        inputs = processor(text=[text], images=[r.image], return_tensors="pt")
        prompt_len = int(batch.prompt_lens_N[n])
        assert inputs["input_ids"][0].tolist() == batch.prompt_ids_NL[n, :prompt_len].tolist()
        for g in range(batch.group_size):
            ids = torch.tensor([batch.sequence(n, g)])
            # transformers 5 needs mm_token_type_ids for the image's 3-D rope positions (silently 1-D without)
            mm_types = torch.zeros_like(ids)
            mm_types[:, :prompt_len] = inputs["mm_token_type_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types,
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                               use_cache=False).logits[0].float()
            size = int(batch.response_lens_NG[n, g])
            pred = logits[prompt_len - 1: prompt_len - 1 + size]  # position t predicts response token t
            lp = torch.log_softmax(pred, -1).gather(-1, ids[0, prompt_len:, None]).squeeze(-1)
            logprobs[n, g, :size] = lp * batch.policy_mask_NGT[n, g, :size]
            q[n, g] = score_distribution(pred[int(batch.score_index_NG[n, g])], score_ids)
    return logprobs, q


@pytest.fixture(scope="session")
def teacher_force():
    return _teacher_force
