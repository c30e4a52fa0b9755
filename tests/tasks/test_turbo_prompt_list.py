"""Turbo++ on a plain prompt list (a `zray data import --kind prompts` folder, `data.dir`): generator rows with a
stable id derived from the prompt id, teacher samples without renders (collected, read back, resumed), the task's
"latents" / "images" / "online" real data from them, and "renders" refused."""

import json

import numpy as np
import pytest
import torch

from zray.config import ConfigError, DataConfig, GeneratorConfig, TurboConfig, turbo_variant
from zray.data.imported import prompt_rows
from zray.data.importers import import_data
from zray.data.teacher_samples import collect_teacher_samples, read_teacher_samples
from zray.models.tiny import build_tiny_zimage
from zray.tasks.turbo import TurboTask

SIZE = 32
GEN = GeneratorConfig(dim=32, num_layers=2, num_refiner_layers=1, num_heads=2, vae_block_channels=(8, 16, 16),
                      text_hidden_size=32, text_num_layers=2, seed=5)
TURBO = TurboConfig(disc_head_hidden=8, lora_rank=2, disc_lr=1e-2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt_list")
    rows = [{"prompt": f"a {c} lantern in fog", "prompt_id": f"p{i}"} for i, c in enumerate(
        ("red", "blue", "green", "white", "black", "amber", "violet", "grey"))]
    (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_data(tmp / "p.jsonl", tmp / "imp", kind="prompts")
    return DataConfig(dir=str(tmp / "imp"), test_frac=0.25, heldout_frac=0.0)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_zimage(GEN, tmp_path_factory.mktemp("prompt_list_gen"), image_size=SIZE)


def test_prompt_rows_carry_a_stable_id_and_name_the_setting(data):
    train, test = prompt_rows(data, "train", 0, "x.num"), prompt_rows(data, "test", 0, "x.num")
    assert train and test and not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    assert all(r["image_id"] == f"prompt-{r['prompt_id']}" and "image" not in r for r in train + test)
    assert prompt_rows(data, "train", 2, "x.num") == train[:2]
    with pytest.raises(ConfigError, match=rf"distill_generator.num_eval_prompts=99 is not allowed: the test split .* "
                                          rf"has {len(test)} prompts"):
        prompt_rows(data, "test", 99, "distill_generator.num_eval_prompts")


def test_teacher_samples_of_a_prompt_list_train_every_real_data_but_renders(data, pipe_dir, tmp_path):
    rows = prompt_rows(data, "train", 3, "distill_generator.num_teacher_samples")
    table = collect_teacher_samples(pipe_dir, rows, out_dir=tmp_path, seed=1, image_size=SIZE, chunk_size=2)
    assert table.column("render").null_count == 3
    assert table.column("image_id").to_pylist() == [r["image_id"] for r in rows]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["first_image_id"] == rows[0]["image_id"]
    assert read_teacher_samples(tmp_path).num_rows == 3  # null renders pass the checks
    again = collect_teacher_samples(pipe_dir, rows, out_dir=tmp_path, seed=1, image_size=SIZE, chunk_size=2)
    assert again.equals(table)  # resumed from the parts, nothing resampled
    batch = {k: np.array(v, dtype=object) for k, v in table.slice(0, 2).to_pydict().items()}
    for mode in ("latents", "images"):
        task = TurboTask(pipe_dir, TURBO, teacher_samples=mode, image_size=SIZE)
        student = task.build_model()
        collated = task.collate(batch)
        assert collated["real"].shape == collated["teacher_x0"].shape
        loss, _ = task.loss(student, collated)
        assert torch.isfinite(loss)
    online = TurboTask(pipe_dir, TURBO, teacher_samples="online", image_size=SIZE)
    online.build_model()
    plain = {k: np.array([r[k] for r in rows[:2]], dtype=object) for k in ("image_id", "prompt")}
    assert torch.isfinite(online.collate(plain)["real"]).all()
    renders = TurboTask(pipe_dir, turbo_variant(TURBO, "renders"), image_size=SIZE)
    renders.build_model()
    with pytest.raises(ValueError, match=r"turbo.real_data='renders' is not allowed for these rows: they carry no "
                                         r"world render"):
        renders.collate(batch)
