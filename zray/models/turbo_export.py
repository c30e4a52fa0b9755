"""Export the Turbo++ two-step student as a folder that diffusers alone samples (issue 17, deliverable 5).

The student's sampler (`zray.sampling.two_step_sample` with the default re-noise, the same eps) is exactly
`ZImagePipeline`'s 2-step Euler sampler at guidance 0, provided the network is switched between the steps:
with the scheduler's static shift s the pipeline's 2-step sigmas are 1 -> sigma_2 -> 0, where
sigma_2 = s * 0.5 / (1 + (s - 1) * 0.5) (0.75 for s = 3), the network is called at t = 1 - sigma, and

    step 1 (sigma 1):       x = eps + (1 - sigma_2) u1 = (1 - sigma_2) x0_1 + sigma_2 eps = x_s2
    step 2 (sigma sigma_2): x = x_s2 + sigma_2 u2 = x0_2.

`ZImagePipeline.__call__` reads `self.transformer` (and its active LoRA adapters) at every step and calls
`callback_on_step_end(pipe, i, t, kwargs)` after step i, so the switch is a three-line callback (see the README
this module writes). Nothing of zray is needed to sample the export.

Layout written by `export_two_step_pipeline` (the base pipeline's text encoder, tokenizer, VAE, scheduler and
`model_index.json` copied as they are):
- "copies": `transformer/` = step 1, `transformer_2/` = step 2 (outside `model_index.json`: load it yourself);
- "shared": `transformer/` = the trained transformer (a plain 2-step `ZImagePipeline`);
- "lora": `transformer/` = the frozen trunk, `lora_step1.safetensors`, `lora_step2.safetensors` (diffusers
  pipeline LoRA format: `pipe.load_lora_weights(dir, weight_name=..., adapter_name="step1")`).
Plus `README.md` (the recipe) and `turbo_pipeline.json` (the same facts for programs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from zray.models.turbo import LORA_WEIGHT_NAME, META_FILE, STEPS, TwoStepStudent
from zray.sampling import TURBO_SIGMA_2
from zray.training.runs import atomic_dir

RENOISE_MODES = ("same", "fresh")
EXPORT_META_FILE = "turbo_pipeline.json"
SIGMA_2_TOLERANCE = 1e-6
STEP2_TRANSFORMER = "transformer_2"


def lora_weight_name(k: int) -> str:
    return f"lora_step{k}.safetensors"


def export_two_step_pipeline(student_dir_or_student: str | Path | TwoStepStudent, base_pipeline_dir: str | Path,
                             out_dir: str | Path, *, sigma_2: float = TURBO_SIGMA_2, renoise: str = "same") -> Path:
    """Write the diffusers folder of the module docstring under `out_dir` (new or empty); return it. The folder is
    built beside it and renamed into place (`zray.training.runs.atomic_dir`): `out_dir` holds a whole export or none.

    `student_dir_or_student` is a `TwoStepStudent` or a dir written by its `save_pretrained`;
    `base_pipeline_dir` a local `ZImagePipeline` folder (the 8-step teacher) whose scheduler the export keeps.
    Refuses what the pipeline cannot reproduce: `renoise="fresh"` (the pipeline's Euler step re-uses eps), a
    `sigma_2` other than the 2-step sigma of the base scheduler, a dynamic-shift or stochastic scheduler.
    """
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise={renoise!r} is not allowed: expected one of {RENOISE_MODES}")
    if renoise != "same":
        raise ValueError(f"renoise={renoise!r} is not allowed for a diffusers export: ZImagePipeline's Euler step "
                         "re-noises with the same eps; expected 'same'")
    base = Path(base_pipeline_dir)
    index = _base_index(base)
    _check_schedule(base, float(sigma_2))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out_dir={str(out)!r} is not allowed: it exists and is not empty; expected a new or "
                         "empty dir")
    with atomic_dir(out) as building:  # a crash leaves no partial pipeline (one that might load) under out_dir
        _write_pipeline(student_dir_or_student, base, index, building, out, float(sigma_2), renoise)
    return out


def _write_pipeline(student_dir_or_student: str | Path | TwoStepStudent, base: Path, index: dict[str, Any],
                    out: Path, final: Path, sigma_2: float, renoise: str) -> None:
    """The folder of `export_two_step_pipeline`, written into `out` (a temporary folder that becomes `final`)."""
    if isinstance(student_dir_or_student, TwoStepStudent):  # saved straight into out_dir, then moved into place
        src, move = student_dir_or_student.save_pretrained(out / ".student"), True
    else:
        src, move = Path(student_dir_or_student), False
        if not (src / META_FILE).exists():
            raise FileNotFoundError(f"{str(src / META_FILE)!r} not found: expected a TwoStepStudent or a dir written "
                                    "by TwoStepStudent.save_pretrained")
    decoupling = json.loads((src / META_FILE).read_text())["decoupling"]

    for name, value in index.items():  # every component but the transformer, as the base has it
        if not name.startswith("_") and name != "transformer" and isinstance(value, list) and value[0]:
            shutil.copytree(base / name, out / name)
    shutil.copy2(base / "model_index.json", out / "model_index.json")
    place = shutil.move if move else shutil.copytree
    if decoupling == "copies":
        place(str(src / "transformer_step1"), str(out / "transformer"))
        place(str(src / "transformer_step2"), str(out / STEP2_TRANSFORMER))
    else:
        place(str(src / "transformer"), str(out / "transformer"))
    if decoupling == "lora":
        for k in STEPS:
            _write_pipeline_lora(src / f"lora_step{k}" / LORA_WEIGHT_NAME, out, lora_weight_name(k))
    if move:
        shutil.rmtree(src)

    meta = {"decoupling": decoupling, "sigma_2": float(sigma_2), "renoise": renoise, "num_inference_steps": 2,
            "guidance_scale": 0.0}
    if decoupling == "copies":
        meta["step2_transformer"] = STEP2_TRANSFORMER
    if decoupling == "lora":
        meta["lora_weights"] = {f"step{k}": lora_weight_name(k) for k in STEPS}
    (out / EXPORT_META_FILE).write_text(json.dumps(meta, indent=1))
    (out / "README.md").write_text(readme(final.resolve(), decoupling, float(sigma_2)))


def _base_index(base: Path) -> dict[str, Any]:
    path = base / "model_index.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found: expected a local ZImagePipeline folder "
                                "(written by save_pretrained) as base_pipeline_dir")
    index = json.loads(path.read_text())
    if index.get("_class_name") != "ZImagePipeline":
        raise ValueError(f"model_index.json _class_name={index.get('_class_name')!r} is not allowed: expected "
                         "'ZImagePipeline'")
    scheduler = index.get("scheduler") or [None, None]
    if scheduler[1] != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"model_index.json scheduler={scheduler!r} is not allowed: expected "
                         "['diffusers', 'FlowMatchEulerDiscreteScheduler'] (the student's sampler is Euler)")
    return index


def _check_schedule(base: Path, sigma_2: float) -> None:
    """The base scheduler's 2-step sigmas, as `ZImagePipeline` sets them, must be 1 -> sigma_2 -> 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(base / "scheduler"))
    cfg = scheduler.config
    for field in ("use_dynamic_shifting", "stochastic_sampling"):
        if cfg.get(field, False):
            raise ValueError(f"scheduler {field}={cfg.get(field)!r} is not allowed: the 2-step sigmas must be fixed "
                             "and the step deterministic; expected False")
    scheduler.set_timesteps(sigmas=[1.0, 0.5])  # `get_default_z_image_sigmas(2)`, then the scheduler's shift
    sigmas = [float(s) for s in scheduler.sigmas]
    ok_ends = len(sigmas) == 3 and abs(sigmas[0] - 1.0) < SIGMA_2_TOLERANCE and sigmas[2] == 0.0
    if not ok_ends or abs(sigmas[1] - sigma_2) > SIGMA_2_TOLERANCE:
        shift = cfg.get("shift")
        raise ValueError(f"sigma_2={sigma_2} is not allowed: the base scheduler (shift={shift}) gives the 2-step "
                         f"sigmas {[round(s, 6) for s in sigmas]} (shift * 0.5 / (1 + (shift - 1) * 0.5) for a "
                         f"static shift); expected sigma_2={sigmas[1]:.6g} and a schedule 1 -> sigma_2 -> 0")


def _write_pipeline_lora(src_file: Path, out: Path, weight_name: str) -> None:
    """A `save_lora_adapter` file (unprefixed keys) -> a pipeline LoRA file (`transformer.` keys, same config)."""
    from diffusers import ZImagePipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(src_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    if LORA_ADAPTER_METADATA_KEY not in metadata:
        raise ValueError(f"{str(src_file)!r} has no {LORA_ADAPTER_METADATA_KEY!r} metadata: expected a file written "
                         "by save_lora_adapter (it holds the adapter's rank and alpha)")
    ZImagePipeline.save_lora_weights(str(out), transformer_lora_layers=tensors, weight_name=weight_name,
                                     transformer_lora_adapter_metadata=json.loads(metadata[LORA_ADAPTER_METADATA_KEY]))


# ------------------------------------------------------------------------------------------- the README

_LOAD = {
    "copies": '''pipe = ZImagePipeline.from_pretrained(path, dtype=dtype).to(device)
transformer_1 = pipe.transformer  # step 1 (sigma 1)
transformer_2 = ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer_2", dtype=dtype).to(device)


def two_step(pipe, i, t, callback_kwargs):  # after step i: step 2 runs transformer_2, then transformer_1 is back
    pipe.transformer = transformer_2 if i == 0 else transformer_1
    return {}
''',
    "lora": '''pipe = ZImagePipeline.from_pretrained(path, dtype=dtype).to(device)
pipe.load_lora_weights(path, weight_name="lora_step1.safetensors", adapter_name="step1")
pipe.load_lora_weights(path, weight_name="lora_step2.safetensors", adapter_name="step2")
pipe.set_adapters("step1")  # step 1 (sigma 1)


def two_step(pipe, i, t, callback_kwargs):  # after step i: step 2 runs adapter step2, then step1 is back
    pipe.set_adapters("step2" if i == 0 else "step1")
    return {}
''',
    "shared": '''pipe = ZImagePipeline.from_pretrained(path, dtype=dtype).to(device)
two_step = None  # one network for both steps: nothing to switch
''',
}

_HEAD = {
    "copies": "two independent transformers: `transformer/` runs step 1 and `transformer_2/` runs step 2 "
              "(`transformer_2/` is not in `model_index.json`; the recipe loads it).",
    "lora": "one transformer (`transformer/`) with one LoRA adapter per step: `lora_step1.safetensors` for step 1, "
            "`lora_step2.safetensors` for step 2 (needs `peft`).",
    "shared": "one transformer (`transformer/`) for both steps: this is a plain 2-step `ZImagePipeline`.",
}


def readme(path: Path, decoupling: str, sigma_2: float) -> str:
    """The folder's README: what it holds and the recipe (two ```python blocks: load, then sample)."""
    return f"""# Turbo++ two-step student (Z-Image)

A 2-step text-to-image generator distilled from an 8-step Z-Image teacher, loadable with `diffusers` alone
(`ZImagePipeline`, diffusers >= 0.42). Decoupling "{decoupling}": {_HEAD[decoupling]}

It samples with the pipeline's own 2-step Euler schedule (sigmas 1 -> {sigma_2:g} -> 0 at the scheduler's shift)
and **guidance 0**; the network is switched between the two steps with `callback_on_step_end`. Keep
`num_inference_steps=2`, `guidance_scale=0.0` and the default `sigmas`: any other schedule is not the student.

## Load

```python
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

path = {json.dumps(str(path))}  # this folder
dtype, device = torch.bfloat16, "cuda"
{_LOAD[decoupling]}```

## Sample

```python
prompts = ["a red circle left of a blue square", "two yellow stars on a black background"]
images = pipe(prompts, height=1024, width=1024, num_inference_steps=2, guidance_scale=0.0,
              callback_on_step_end=two_step).images  # PIL images
images[0].save("turbo_0.png")
```

Pass `generator=torch.Generator().manual_seed(0)` or `latents=` for reproducible samples; the callback puts step 1's
network back after step 2, so `pipe` is ready for the next call. With model CPU offloading the switched-in network
is not managed by the offload hooks: keep both on the device.
"""
