"""Test-session environment and shared fixtures: offline hub, tiny vLLM KV cache, in-process vLLM engines, one Ray
instance for the whole session (`ray_session`), one vLLM engine (`teacher_engine`), the tiny model zoo.

Markers mean what they say: a test that uses Ray (`ray_session`) or a vLLM engine (`teacher_engine`) is marked
`slow` automatically, so `pytest -m "not slow"` is the quick tier and needs neither.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default; polling faster shortens the tail of every fit.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# ------------------------------------------------------------------ tiny model zoo (built once per session)

import pytest  # noqa: E402

SLOW_FIXTURES = ("ray_session", "teacher_engine", "readme_pipeline")  # a test that uses one of these is `slow`


@pytest.hookimpl(tryfirst=True)  # before -m filters the items
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """The test session's one local Ray instance (4 logical CPUs: two learner workers and two engine actors),
    started by the first test that needs it and stopped at the end of the session. Tests never call
    ray.init / ray.shutdown themselves, and stop every actor they start."""
    ray = pytest.importorskip("ray")
    from actors.learner import ray_runtime_env

    if not ray.is_initialized():  # with the learner's log filters, as `init_ray` starts it
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
    yield ray
    ray.shutdown()


# The README's first command runs in the background from the end of collection, beside the rest of the suite (its
# stages leave a core idle much of the time: one learner worker per tiny fit, process start-up, polling); the tests
# that read its run are moved to the end, and the first of them waits for it.
_README_RUN: dict = {}


def _readme_command(root):
    import re

    match = re.search(r"```bash\n(.*?)\n```", (root / "README.md").read_text(), flags=re.S)
    assert match, "README.md has no ```bash block"
    return match.group(1).strip()


def _reads_readme_run(item) -> bool:
    return "readme_pipeline" in getattr(item, "fixturenames", ())


class _ReadersLast:
    """Moves the tests that read the README run to the end (after -m has deselected: trylast)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        readers = [item for item in items if _reads_readme_run(item)]
        if readers:
            items[:] = [item for item in items if item not in readers] + readers


def pytest_configure(config):
    config.pluginmanager.register(_ReadersLast(), "zray-readme-readers-last")


def pytest_collection_finish(session):
    """Start the README's first command if a test that will run reads its run (not with --collect-only)."""
    import shutil
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    if session.config.option.collectonly or not any(_reads_readme_run(item) for item in session.items):
        return
    root = Path(__file__).resolve().parents[1]
    command, run_dir = _readme_command(root), root / "runs" / "tiny_cpu"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = Path(tempfile.mkdtemp(prefix="zray-readme-")) / "stdout.txt"
    # RAY_ADDRESS=local: its own Ray instance, whatever else this machine runs (never the test session's)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"}
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    _README_RUN.update(proc=proc, command=command, run_dir=run_dir, log=log, started=time.time())


def pytest_sessionfinish(session, exitstatus):
    """A README run still going when the session ends (-x, Ctrl-C, no reader reached) is stopped with its tree."""
    import signal

    proc = _README_RUN.get("proc")
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def readme_pipeline():
    """The README's first command (its first ```bash block: the install check, then `zray run --recipe tiny_cpu`),
    run as written, once per session, started in the background when collection ends (`pytest_collection_finish`):
    every stage for real into the tiny_cpu recipe's out_dir, `runs/tiny_cpu`. The end-to-end tests of the stages'
    jobs read its outputs. That folder belongs to the tests: it is removed first, so that every stage runs the code
    as it is now (a finished run would be skipped stage by stage). Returns {"command", "run_dir", "stdout",
    "started"}."""
    import subprocess

    assert _README_RUN, "the README run was not started at collection (pytest_collection_finish)"
    proc = _README_RUN["proc"]
    try:
        proc.wait(timeout=1500)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{_README_RUN['command']}` still running after 1500 s: {_README_RUN['log']}")
    stdout = _README_RUN["log"].read_text(errors="replace")
    assert proc.returncode == 0, stdout[-6000:]
    return {"command": _README_RUN["command"], "run_dir": _README_RUN["run_dir"], "stdout": stdout,
            "started": _README_RUN["started"]}


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


# ------------------------------------------------------------------ rollouts without vLLM


def _synthetic_rollout(processor, requests, group_size, max_reasoning, seed=0, *, temperature=1.0, version=0,
                       token_logprob=-1.5):
    """A RolloutBatch as an engine would return it (real prompt ids, random Shapes-word reasoning of 1 to
    `max_reasoning` tokens, canonical score prefix, score token drawn from a random q), built by the engines' own
    vLLM-free assembly (`actors.teacher_engine.rollouts.assemble_rollout`)."""
    import torch

    from actors.teacher_engine.rollouts import PrefixIds, RolloutSample, assemble_rollout
    from zray.rubric import render_generation_prompt
    from zray.scores import score_token_ids
    from zray.types import FINISH_PREFIX

    tok = processor.tokenizer
    gen = torch.Generator().manual_seed(seed)
    words = tok.encode(" red circle blue square star left of two", add_special_tokens=False)
    prefix = PrefixIds(tok)
    prompts, samples = [], []
    for r in requests:
        text = render_generation_prompt(processor, r.prompt, r.dimension, reasoning=True)
        prompts.append(processor(text=[text], images=[r.image], return_tensors="pt")["input_ids"][0].tolist())
        row = []
        for _ in range(group_size):
            k = int(torch.randint(1, max_reasoning + 1, (1,), generator=gen))
            ids = [words[int(j)] for j in torch.randint(len(words), (k,), generator=gen)]
            row.append(RolloutSample(ids, [token_logprob] * k, FINISH_PREFIX, prefix.after(ids), seed))
        samples.append(row)
    logprobs_BK = torch.log_softmax(torch.randn(len(requests) * group_size, 9, generator=gen, dtype=torch.float64), -1)
    return assemble_rollout(prompts, samples, logprobs_BK, score_token_ids(processor), temperature, version)


@pytest.fixture(scope="session")
def synthetic_rollout():
    return _synthetic_rollout


# ------------------------------------------------------------------ a task's loss through a real DDP wrapper



def _plain_then_ddp(task, batch, tmp_path):
    """(model, plain, [ddp, ddp]): task.loss's value, metrics and gradients on the bare model, then twice on the same
    model inside a DistributedDataParallel of a 1-process gloo group (a second DDP step fails when a trainable
    parameter got no gradient in the first).

    The group is this test's own: a fresh default group (destroyed afterwards) when torch.distributed is not
    initialised, else a new gloo subgroup of the existing 1-process default group (an in-process vLLM engine of
    the test session initialises one)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = task.build_model()

    def step(module):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, metrics = task.loss(module, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), metrics, grads

    plain = step(model)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "gloo_store"), 1), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        group = None if owned else dist.new_group(ranks=[0], backend="gloo")
        ddp = DistributedDataParallel(model, process_group=group)
        wrapped = [step(ddp) for _ in range(2)]
    finally:
        if owned:
            dist.destroy_process_group()
    return model, plain, wrapped


@pytest.fixture
def plain_then_ddp():
    return _plain_then_ddp


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is as fast, and far faster when other jobs load the machine (no spin-waiting).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
