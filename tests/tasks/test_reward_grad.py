"""The reward-gradient task (zray/tasks/reward_grad.py) on tiny models: gradients reach the generator's trainable
parameters through the frozen VAE and the frozen student reward (which get none), the window over the whole
schedule and DRaFT-K, LoRA trains adapters only, the Turbo++ student through a real DDP wrapper, the flow-matching
regulariser, and the saved weights round-trip."""

import dataclasses

import numpy as np
import pytest
import torch

from zray.config import GeneratorConfig, RewardFinetuneConfig, VLMConfig, WorldConfig
from zray.data.corpus import generator_rows
from zray.data.world import ALL_COMBOS
from zray.models.generator import load_zimage, sample_latents
from zray.models.reward_generator import BASE_LORA_FILE, META_FILE, RewardGenerator, turbo_lora_file
from zray.models.tiny import build_tiny_vlm, build_tiny_zimage, sharpen_score_head
from zray.models.turbo import TwoStepStudent
from zray.tasks.reward_grad import RewardGradTask

SIZE = 32
GEN = GeneratorConfig(dim=32, num_layers=1, num_refiner_layers=1, num_heads=2, vae_block_channels=(8, 16, 16),
                      text_hidden_size=32, text_num_layers=2, seed=5)
CFG = RewardFinetuneConfig(lora_rank=2, base_steps=4, dimensions=("alignment", "realism"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"pipe": tiny ZImagePipeline, "reward": tiny student (sharpened score head), "turbo": TwoStepStudent copies}."""
    from zray.models.vlm import load_vlm
    from zray.scores import score_token_ids

    root = tmp_path_factory.mktemp("reward_grad")
    pipe = build_tiny_zimage(GEN, root / "pipe", image_size=SIZE)
    reward = build_tiny_vlm(VLMConfig(seed=4), root / "reward", image_size=SIZE)
    model, processor = load_vlm(reward)
    sharpen_score_head(model, score_token_ids(processor), scale=3.0, seed=1)
    model.save_pretrained(reward)
    turbo = TwoStepStudent(load_zimage(pipe).transformer, decoupling="copies").save_pretrained(root / "turbo")
    return {"pipe": pipe, "base": pipe, "reward": reward, "turbo": turbo}


@pytest.fixture(scope="module")
def rows():
    out = generator_rows(WorldConfig(image_size=SIZE, num_generator_images=4, num_generator_test_prompts=2),
                         ALL_COMBOS, lambda: None)["train"][:2]
    return {key: np.array([r[key] for r in out], dtype=object) for key in ("image_id", "image", "prompt")}


def _task(dirs, kind="base", **changes):
    return RewardGradTask(dataclasses.replace(CFG, **changes), kind=kind, generator_dir=dirs[kind],
                          pipeline_dir=dirs["pipe"], reward_dir=dirs["reward"], image_size=SIZE)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_gradients_reach_the_generator_through_the_frozen_vae_and_reward(dirs, rows):
    task = _task(dirs, finetune="full", k_min=2, k_max=2)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate({"prompt": rows["prompt"]})
    assert set(batch) == {"cap", "cap_len", "prompts"}  # no renders encoded without the regulariser
    loss, metrics = task.loss(model, batch)
    loss.backward()
    assert metrics["grad_first"] == metrics["grad_last"] == 2.0
    assert metrics["reward"] == pytest.approx(-loss.item(), abs=1e-5)  # equal weights, no regulariser
    assert 1.0 <= metrics["mu_alignment"] <= 5.0 and 1.0 <= metrics["mu_realism"] <= 5.0
    grads = _grads(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(grads) == set(trainable)
    norms = {n: float(g.norm()) for n, g in grads.items()}
    for part in ("layers.0.attention.to_q.weight", "final_layer", "t_embedder", "cap_embedder"):
        assert any(part in n and v > 0 for n, v in norms.items()), part
    vae, reward = task.scorers(torch.device("cpu"))
    for frozen in (vae, reward, task.frozen_parts()["text_encoder"]):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert not reward.model.training  # the frozen student stays in eval mode


def test_the_window_covers_the_whole_schedule_and_draft_k_the_last_steps(dirs, rows):
    task = _task(dirs)
    model = task.build_model()
    batch = task.collate({"prompt": rows["prompt"]})
    torch.manual_seed(1)
    with torch.no_grad():
        seen = {task.loss(model, batch)[1]["grad_last"] for _ in range(12)}
    assert seen <= {1.0, 2.0, 3.0, 4.0} and len(seen) >= 3  # k ~ U{1..4}; early steps included
    draft = _task(dirs, draft_k=2)
    with torch.no_grad():
        m = draft.loss(model, draft.collate({"prompt": rows["prompt"]}))[1]
    assert (m["grad_first"], m["grad_last"]) == (3.0, 4.0)
    with pytest.raises(ValueError, match="k_min=1, k_max=3 are not allowed for a 2-step sampler"):
        _task(dirs, kind="turbo", k_max=3).build_model()  # the student has 2 steps

    # the whole window is zray's own sampler from the same noise; a wider window adds the earlier steps' gradient
    pipe = load_zimage(dirs["pipe"])
    prompts = [str(p) for p in rows["prompt"]]
    noise = torch.randn(task.latent_shape(2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, _ = model(noise, batch["cap"], batch["cap_len"], first=1, last=4)
        assert torch.allclose(ours, sample_latents(pipe, prompts, noise, 4, shift=3.0), atol=1e-5)
    b = next(p for n, p in model.named_parameters() if n.endswith("layers.0.attention.to_q.lora_B.reward.weight"))
    grads = []
    for first in (4, 3):
        model.zero_grad()
        model(noise, batch["cap"], batch["cap_len"], first=first, last=4)[0].square().sum().backward()
        grads.append(b.grad.clone())
    assert grads[0].norm() > 0 and not torch.allclose(grads[0], grads[1])


def test_lora_trains_only_the_adapters_and_round_trips(dirs, rows, tmp_path):
    task = _task(dirs)
    torch.manual_seed(0)
    model = task.build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".reward." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = task.collate({"prompt": rows["prompt"]})
    for _ in range(2):
        opt.zero_grad()
        loss, _ = task.loss(model, batch)
        loss.backward()
        assert set(_grads(model)) == trainable
        assert any(float(g.norm()) > 0 for n, g in _grads(model).items() if "lora_B" in n)
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    task.save_pretrained(model, tmp_path / "lora")
    assert (tmp_path / "lora" / BASE_LORA_FILE).is_file() and (tmp_path / "lora" / META_FILE).is_file()
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "lora")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())
    with pytest.raises(ValueError, match="fine-tuned with 'lora': expected base and 'full'"):
        _task(dirs, finetune="full").load_pretrained(_task(dirs, finetune="full").build_model(), tmp_path / "lora")


def test_turbo_student_through_ddp_and_round_trip(dirs, rows, plain_then_ddp, tmp_path):
    """Step 2's window leaves step 1's copy off the gradient path: it still gets a (zero) gradient, so DDP's reducer
    takes two steps without complaint; step 1's window reaches both copies (end to end)."""
    task = _task(dirs, kind="turbo", k_min=2, k_max=2)
    batch = task.collate({"prompt": rows["prompt"]})
    model, plain, wrapped = plain_then_ddp(task, batch, tmp_path)
    assert isinstance(model, RewardGenerator) and model.num_steps == 2
    assert torch.allclose(model.sigmas(), torch.tensor([1.0, 0.75, 0.0]))
    _, metrics, grads = plain
    assert metrics["grad_last"] == 2.0
    step1 = [g for n, g in grads.items() if n.startswith("student.step1.")]
    step2 = [g for n, g in grads.items() if n.startswith("student.step2.")]
    assert step1 and all(float(g.abs().max()) == 0.0 for g in step1)
    assert any(float(g.abs().max()) > 0 for g in step2 if g.ndim == 2)
    for loss, _, _ in wrapped:
        assert np.isfinite(loss)

    task1 = _task(dirs, kind="turbo", k_min=1, k_max=1, draft_k=2)  # DRaFT-2 on the student: both steps
    model.zero_grad()
    task1.loss(model, batch)[0].backward()
    assert any(float(p.grad.abs().max()) > 0 for n, p in model.named_parameters()
               if n.startswith("student.step1.") and p.grad is not None and p.ndim == 2)
    task.save_pretrained(model, tmp_path / "lora_turbo")
    for k in (1, 2):
        assert (tmp_path / "lora_turbo" / turbo_lora_file(k)).is_file()
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "lora_turbo")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())


def test_flow_matching_regulariser(dirs, rows):
    task = _task(dirs, fm_weight=0.5, k_min=1, k_max=1)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate(rows)
    assert batch["fm_x0"].shape == task.latent_shape(2)[:1] + task.latent_shape(2)[1:]
    loss, metrics = task.loss(model, batch)
    assert metrics["fm"] > 0 and loss.item() == pytest.approx(-metrics["reward"] + 0.5 * metrics["fm"], rel=1e-4)
    assert len(task._cache) == 4  # two prompts, two renders
    turbo = _task(dirs, kind="turbo", fm_weight=1.0, finetune="full")
    _, m = turbo.loss(turbo.build_model(), turbo.collate(rows))
    assert m["fm"] > 0
    with pytest.raises(ValueError, match="expected an 'image' column"):
        task.collate({"prompt": rows["prompt"]})
