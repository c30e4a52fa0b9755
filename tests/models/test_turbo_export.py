"""zray.models.turbo_export: the two-step student sampled by diffusers alone, following the exported README.

Each decoupling is exported, then one fresh Python process (no zray imported) runs each export's README code
blocks (in its own namespace) and samples 2 prompts from given latents; the images must equal zray's
`TwoStepStudent` forward + `vae_decode` from the same noise and prompts, to 1e-5 in [0, 1] pixel units (float32 on
CPU; the two differ only by rounding: the pipeline's Euler steps vs. zray's x0 / re-noise formulas, and
t = (1000 - 1000 sigma) / 1000; measured about 1.1e-6).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from zray.models.generator import encode_prompts, initial_noise, load_zimage, vae_decode
from zray.models.turbo import TwoStepStudent
from zray.models.turbo_export import export_two_step_pipeline
from zray.sampling import two_step_sample

SIZE = 32  # pixels; the tiny VAE downsamples by 2, so 16 x 16 latents
MAX_LEN = 64  # the pipeline's max_sequence_length, as zray's encode_prompts pads
PROMPTS = ["a red circle left of a blue square", "two green stars on a gray background"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def base(tiny_zoo_config, tmp_path_factory):
    from zray.models.tiny import build_tiny_zimage

    path = build_tiny_zimage(tiny_zoo_config.generator, tmp_path_factory.mktemp("zimage_export"), image_size=SIZE)
    return path, load_zimage(path)


def perturbed_student(teacher, decoupling):
    """A student whose two steps differ from the teacher and from each other (a missed switch would show)."""
    torch.manual_seed(0)
    student = TwoStepStudent(teacher, decoupling=decoupling, lora_rank=2, lora_alpha=4.0)
    with torch.no_grad():
        for k, scale in ((1, 0.05), (2, -0.1)):
            params = student.adapter_parameters(k) if decoupling == "lora" else student.transformer(k).parameters()
            for p in params:
                p.add_(scale * torch.randn_like(p))
    return student.eval()


def readme_blocks(folder):
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 2, "the README holds a load block and a sample block"
    load, sample = blocks
    assert 'dtype, device = torch.bfloat16, "cuda"' in load and "height=1024, width=1024" in sample
    return (load.replace('torch.bfloat16, "cuda"', 'torch.float32, "cpu"'),
            sample.replace("height=1024, width=1024", f"height={SIZE}, width={SIZE}"))


def write_recipe(folder, latents, work):
    """The README's two blocks plus a call on given latents, as a script `work/recipe.py` saving `images.npy`."""
    load, sample = readme_blocks(folder)
    np.save(work / "latents.npy", latents.numpy())
    tail = f"""
import sys
import numpy as np
latents = torch.from_numpy(np.load("latents.npy"))
out = pipe({PROMPTS!r}, latents=latents, height={SIZE}, width={SIZE}, num_inference_steps=2, guidance_scale=0.0,
           callback_on_step_end=two_step, output_type="np", max_sequence_length={MAX_LEN}).images
np.save("images.npy", out)
assert "zray" not in sys.modules, "the recipe must not need zray"
"""
    (work / "recipe.py").write_text(load + "\n" + sample + tail)


def run_recipes_in_fresh_process(works):
    """Run each `work/recipe.py` in its own namespace and cwd, all in one new interpreter without zray (one
    process for the three exports: importing diffusers costs about 8 s of CPU per process)."""
    code = f"""
import os, sys
for work in {[str(w) for w in works]!r}:
    os.chdir(work)
    exec(compile(open("recipe.py").read(), os.path.join(work, "recipe.py"), "exec"), {{"__name__": "__main__"}})
assert "zray" not in sys.modules
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=works[0], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def zray_images(pipe, step1_fn, step2_fn, noise):
    with torch.no_grad():
        cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, PROMPTS, MAX_LEN)
        _, _, x0_2 = two_step_sample(step1_fn, step2_fn, noise, cond)
        return (vae_decode(pipe.vae, x0_2).float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


DECOUPLINGS = ("copies", "lora", "shared")


@pytest.fixture(scope="module")
def exports(base, tmp_path_factory):
    """{decoupling: (export dir, zray's images, zray's images with step 1's network for both steps, work dir)},
    after the recipes ran. "lora" is exported from a saved student dir, the others from the module."""
    base_dir, pipe = base
    noise = initial_noise(pipe, len(PROMPTS), seed=7, height=SIZE, width=SIZE)
    result = {}
    for decoupling in DECOUPLINGS:
        tmp = tmp_path_factory.mktemp(f"export_{decoupling}")
        student = perturbed_student(pipe.transformer, decoupling)
        src = student.save_pretrained(tmp / "student") if decoupling == "lora" else student
        out = export_two_step_pipeline(src, base_dir, tmp / "export")
        (tmp / "work").mkdir()
        write_recipe(out, noise, tmp / "work")
        result[decoupling] = (out, zray_images(pipe, student.step_fn(1), student.step_fn(2), noise),
                              zray_images(pipe, student.step_fn(1), student.step_fn(1), noise), tmp / "work")
    run_recipes_in_fresh_process([r[3] for r in result.values()])
    return result


@pytest.mark.parametrize("decoupling", DECOUPLINGS)
def test_diffusers_alone_reproduces_the_student(exports, decoupling):
    out, expected, step1_twice, work = exports[decoupling]
    meta = json.loads((out / "turbo_pipeline.json").read_text())
    assert meta["decoupling"] == decoupling and meta["sigma_2"] == 0.75 and not (out / ".student").exists()
    assert (work / "turbo_0.png").exists()  # the README's own sample call ran
    got = torch.from_numpy(np.load(work / "images.npy"))
    assert got.shape == expected.shape == (len(PROMPTS), SIZE, SIZE, 3)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if decoupling != "shared":  # the steps differ enough that running step 1's network twice would fail the check
        assert (step1_twice - expected).abs().max() > 100 * ATOL


def test_refuses_what_the_pipeline_cannot_reproduce(base, tmp_path):
    base_dir, _ = base
    student = tmp_path / "unused"  # the checks come before the student is read
    with pytest.raises(ValueError, match=r"renoise='fresh' is not allowed.*expected 'same'"):
        export_two_step_pipeline(student, base_dir, tmp_path / "a", renoise="fresh")
    with pytest.raises(ValueError, match=r"renoise='new' is not allowed: expected one of \('same', 'fresh'\)"):
        export_two_step_pipeline(student, base_dir, tmp_path / "a", renoise="new")
    with pytest.raises(ValueError, match=r"sigma_2=0.5 is not allowed.*shift=3.0.*expected sigma_2=0.75"):
        export_two_step_pipeline(student, base_dir, tmp_path / "a", sigma_2=0.5)

    other = tmp_path / "base_shift2"  # a base with another shift gives another sigma_2
    shutil.copytree(base_dir / "scheduler", other / "scheduler")
    shutil.copy2(base_dir / "model_index.json", other / "model_index.json")
    cfg_path = other / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "shift": 2.0}))
    with pytest.raises(ValueError, match=r"sigma_2=0.75 is not allowed.*shift=2.0.*expected sigma_2=0.666667"):
        export_two_step_pipeline(student, other, tmp_path / "a")
    cfg_path.write_text(json.dumps({**cfg, "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="scheduler use_dynamic_shifting=True is not allowed"):
        export_two_step_pipeline(student, other, tmp_path / "a")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="out_dir=.*is not empty"):
        export_two_step_pipeline(student, base_dir, tmp_path / "full")
    with pytest.raises(FileNotFoundError, match="turbo_student.json"):
        export_two_step_pipeline(student, base_dir, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        export_two_step_pipeline(student, tmp_path, tmp_path / "c")
