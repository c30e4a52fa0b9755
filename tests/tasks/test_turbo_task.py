"""Turbo++ as a learner task on a tiny Z-Image: precomputed teacher samples (Parquet, resumable, the same noise
as the student), the alternating discriminator / generator updates and their gradient isolation, the ablation
switches, and the task state a resumed run restores."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from zray.config import GeneratorConfig, TurboConfig, WorldConfig, turbo_variant
from zray.data.corpus import generator_rows
from zray.data.parquet import DataError
from zray.data.teacher_samples import (collect_teacher_samples, latents_from_bytes, noise_batch,
                                       read_teacher_samples)
from zray.data.world import ALL_COMBOS
from zray.models.generator import encode_prompts, load_zimage, transformer_fn
from zray.models.tiny import build_tiny_zimage
from zray.sampling import flow_sigmas, teacher_state
from zray.tasks.turbo import TurboTask

SIZE = 32
GEN = GeneratorConfig(dim=32, num_layers=2, num_refiner_layers=1, num_heads=2, vae_block_channels=(8, 16, 16),
                      text_hidden_size=32, text_num_layers=2, seed=5)
TURBO = TurboConfig(disc_head_hidden=8, lora_rank=2, disc_lr=1e-2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world_rows():
    cfg = WorldConfig(image_size=SIZE, num_generator_images=6, num_generator_test_prompts=2)
    return generator_rows(cfg, ALL_COMBOS, lambda: None)["train"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_zimage(GEN, tmp_path_factory.mktemp("turbo_gen"), image_size=SIZE)


@pytest.fixture(scope="module")
def samples(pipe_dir, world_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_samples")
    table = collect_teacher_samples(pipe_dir, world_rows, out_dir=out, seed=3, image_size=SIZE, chunk_size=4)
    return out, table


def _batch_rows(table, n=4):
    return {k: np.array(v, dtype=object) for k, v in table.slice(0, n).to_pydict().items()}


def test_teacher_samples_start_from_the_stored_noise_and_resume(samples, pipe_dir, world_rows):
    out, table = samples
    assert table.num_rows == len(world_rows) and len(list(out.glob("part-*.parquet"))) == 2
    rows = table.slice(0, 4).to_pydict()  # the first chunk, as it was sampled (batch shapes change the rounding)
    shape = tuple(rows["latent_shape"][0])
    pipe = load_zimage(pipe_dir)
    cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, rows["prompt"])
    with torch.no_grad():
        mid = teacher_state(transformer_fn(pipe.transformer), noise_batch(rows["noise_seed"], shape),
                            flow_sigmas(8, 3.0), cond, num_steps=4)
    assert torch.equal(mid, latents_from_bytes(rows["teacher_mid"], shape))  # bit for bit, from the seed
    # a lost chunk is recomputed identically; other settings are refused rather than mixed
    (out / "part-00001.parquet").unlink()
    again = collect_teacher_samples(pipe_dir, world_rows, out_dir=out, seed=3, image_size=SIZE, chunk_size=4)
    assert again.equals(table)
    with pytest.raises(ValueError, match="other settings"):
        collect_teacher_samples(pipe_dir, world_rows, out_dir=out, seed=4, image_size=SIZE, chunk_size=4)
    assert read_teacher_samples(out).num_rows == len(world_rows)


def test_read_teacher_samples_names_the_bad_value(samples, tmp_path):
    _, table = samples
    values = [b"\x00" * 3] + table.column("teacher_mid").to_pylist()[1:]
    bad = table.set_column(table.column_names.index("teacher_mid"), "teacher_mid", pa.array(values, pa.binary()))
    pq.write_table(bad, str(tmp_path / "part-00000.parquet"))
    with pytest.raises(DataError, match=r"row 0, column teacher_mid: 3 bytes"):
        read_teacher_samples(tmp_path)


def _heads(task):
    return {k: v.detach().clone() for k, v in task.parts()["disc"].heads.state_dict().items()}


def test_one_step_updates_heads_and_student_each_from_its_own_loss(pipe_dir, samples):
    task = TurboTask(pipe_dir, TURBO, image_size=SIZE)
    torch.manual_seed(0)
    student = task.build_model()
    teacher_before = {k: v.clone() for k, v in task.parts()["teacher"].state_dict().items()}
    batch = task.collate(_batch_rows(samples[1]))
    assert batch["noise"].shape == batch["real"].shape == batch["teacher_mid"].shape
    heads_before = _heads(task)
    loss, metrics = task.loss(student, batch)
    # the discriminator step ran (heads moved) and left no gradient behind for the generator loss to mix into
    assert any(not torch.equal(heads_before[k], v) for k, v in _heads(task).items())
    assert all(p.grad is None for p in task.parts()["disc"].heads.parameters())
    loss.backward()
    assert all(p.grad is None for p in task.parts()["disc"].heads.parameters())
    assert all(p.grad is None for p in task.parts()["teacher"].parameters())
    for step in (student.step1, student.step2):  # end to end: both steps learn from the generator loss
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in step.parameters())
    for k, v in task.parts()["teacher"].state_dict().items():
        assert torch.equal(v, teacher_before[k])
    for key in ("d_loss", "adv_loss", "step1_loss", "x0_mse_to_teacher", "d_grad_norm"):
        assert np.isfinite(metrics[key]), key


def test_detached_without_step1_loss_gives_step1_no_gradient(pipe_dir, samples):
    cfg = turbo_variant(turbo_variant(TURBO, "detached"), "no_step1")
    task = TurboTask(pipe_dir, cfg, image_size=SIZE)
    student = task.build_model()
    loss, metrics = task.loss(student, task.collate(_batch_rows(samples[1])))
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.step1.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.step2.parameters())
    assert "step1_loss" not in metrics


def test_paired_regression_alone_pulls_the_student_to_the_teacher(pipe_dir, samples):
    # with a perturbed student and only the paired regression on, a few updates reduce its distance to the teacher
    cfg = dataclasses.replace(TURBO, lam_adv=0.0, lam_1=0.0, lam_reg=1.0, decoupling="shared")
    task = TurboTask(pipe_dir, cfg, image_size=SIZE)
    torch.manual_seed(0)
    student = task.build_model()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = task.collate(_batch_rows(samples[1]))
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, m = task.loss(student, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(m["paired_loss"])
    assert losses[-1] < 0.9 * losses[0], losses


def test_task_state_round_trips_heads_and_their_optimizer(pipe_dir, samples):
    task = TurboTask(pipe_dir, TURBO, image_size=SIZE)
    student = task.build_model()
    task.loss(student, task.collate(_batch_rows(samples[1])))
    state = task.task_state()
    assert int(state["gen_steps"]) == 1 and any(k.endswith(".exp_avg_sq") for k in state)
    other = TurboTask(pipe_dir, TURBO, image_size=SIZE)
    other.build_model()
    other.load_task_state(state)
    again = other.task_state()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("mode", ["online", "images", "renders"])
def test_real_data_sources(pipe_dir, samples, world_rows, mode):
    cfg = turbo_variant(TURBO, "renders") if mode == "renders" else TURBO
    task = TurboTask(pipe_dir, cfg, teacher_samples="latents" if mode == "renders" else mode, image_size=SIZE)
    student = task.build_model()
    if mode == "online":  # world rows only: the teacher samples inside collate
        rows = {k: np.array([r[k] for r in world_rows[:2]], dtype=object) for k in ("image_id", "prompt", "image")}
    else:
        rows = _batch_rows(samples[1], 2)
    batch = task.collate(rows)
    if mode == "online":
        assert not torch.equal(batch["real"], task.collate(rows)["real"])  # fresh noise every step
    else:
        assert not torch.equal(batch["real"], batch["teacher_x0"])  # VAE-encoded images, not the stored latents
    loss, _ = task.loss(student, batch)
    assert torch.isfinite(loss)


def test_bad_settings_are_named(pipe_dir, samples):
    with pytest.raises(ValueError, match="teacher_samples='video'"):
        TurboTask(pipe_dir, TURBO, teacher_samples="video")
    task = TurboTask(pipe_dir, TURBO, image_size=SIZE)
    task.build_model()
    rows = {k: v for k, v in _batch_rows(samples[1], 2).items() if k != "noise_seed"}
    with pytest.raises(KeyError, match="noise_seed"):
        task.collate(rows)
