"""The Turbo++ student: a two-step generator with step-decoupled parameters (methods.md §6).

`TwoStepStudent` holds the networks of the two sampler steps, each initialised from the 8-step teacher's
`ZImageTransformer2DModel`, in one of three parameterisations (`decoupling`):

- "copies" (the spec's default): two independent full copies, `step1` and `step2`;
- "lora": one frozen trunk (`shared`) with one peft LoRA adapter per step ("step1", "step2"); the step's
  adapter is activated for its call, only adapter weights are trainable;
- "shared": one set of parameters for both steps (`shared`), the ablation baseline.

The sampler math is `zray.sampling.two_step_sample`; `step_fn(k)` gives it step k's model function, and
`forward` runs it (call the module, not `step_fn`, under DDP / DeepSpeed). Whether step 1 sees the gradient of
the final image's losses is the sampler's `detach_steps`, not a property of the networks.

LoRA and gradients: peft's `set_adapter` also sets `requires_grad=False` on the inactive adapter, and autograd
then drops that adapter's gradient even for a forward it already ran; so activating step 2 after step 1 would
silently cut step 1 out of end-to-end training. `_activate` restores the adapters' requires_grad flags after
switching, so each adapter gets exactly the gradient of the calls it took part in.

Saved layout (`save_pretrained`, read back by `TwoStepStudent.from_pretrained`), diffusers format throughout:
`turbo_student.json` (the parameterisation), then "copies": `transformer_step1/`, `transformer_step2/`;
"shared": `transformer/`; "lora": `transformer/` (the trunk, without adapters) + `lora_step1/`,
`lora_step2/` (`save_lora_adapter` files: `transformer.load_lora_adapter(dir, adapter_name=..., prefix=None,
weight_name="pytorch_lora_weights.safetensors")`).

Tensor legend: B batch, C latent channels, H x W latent grid; `cap_feats` one [L_i, D_text] per sample.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from zray.models.generator import transformer_forward
from zray.sampling import TURBO_SIGMA_2, ModelFn, two_step_sample
from zray.training.runs import write_text_atomic

Decoupling = Literal["copies", "lora", "shared"]
DECOUPLINGS: tuple[str, ...] = ("copies", "lora", "shared")
# attention projections and feed-forward of every Z-Image block (refiners and main layers)
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
META_FILE = "turbo_student.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `save_lora_adapter` writes
STEPS = (1, 2)


class TwoStepStudent(nn.Module):
    """The two step networks of the Turbo++ student (see the module docstring).

    `teacher` is a `ZImageTransformer2DModel`; it is copied, never modified. LoRA adapters start as the identity
    (peft's default init: B = 0), so every variant starts as the teacher. `lora_alpha=None` means `lora_rank`.
    """

    def __init__(self, teacher: nn.Module, *, decoupling: Decoupling = "copies", lora_rank: int = 16,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> None:
        super().__init__()
        self._set_meta(decoupling, lora_rank, lora_alpha, lora_targets)
        if decoupling == "copies":
            self.step1 = copy.deepcopy(teacher).requires_grad_(True)
            self.step2 = copy.deepcopy(teacher).requires_grad_(True)
        elif decoupling == "shared":
            self.shared = copy.deepcopy(teacher).requires_grad_(True)
        else:
            from peft import LoraConfig

            self.shared = copy.deepcopy(teacher).requires_grad_(False)
            with warnings.catch_warnings():  # a second adapter is the point here, not a mistake
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                for k in STEPS:
                    self.shared.add_adapter(LoraConfig(r=lora_rank, lora_alpha=self.lora_alpha,
                                                       target_modules=list(self.lora_targets)), adapter_name=f"step{k}")
            for p in self.adapter_parameters():
                p.requires_grad_(True)

    def _set_meta(self, decoupling: str, lora_rank: int, lora_alpha: float | None, lora_targets: Sequence[str]) -> None:
        if decoupling not in DECOUPLINGS:
            raise ValueError(f"decoupling={decoupling!r} is not allowed: expected one of {DECOUPLINGS}")
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r} is not allowed: expected an integer >= 1")
        if lora_alpha is not None and lora_alpha <= 0:
            raise ValueError(f"lora_alpha={lora_alpha!r} is not allowed: expected a float > 0 (None = lora_rank)")
        if decoupling == "lora" and not lora_targets:
            raise ValueError("lora_targets=() is not allowed: expected module names to adapt (e.g. 'to_q')")
        self.decoupling = decoupling
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        self.lora_targets = tuple(lora_targets)

    # ----------------------------------------------------------------------------- the step networks

    def transformer(self, k: int) -> nn.Module:
        """The module step k runs (for "lora" and "shared" both steps run the same module)."""
        if k not in STEPS:
            raise ValueError(f"k={k!r} is not allowed: expected 1 or 2")
        if self.decoupling == "copies":
            return self.step1 if k == 1 else self.step2
        return self.shared

    def adapter_parameters(self, k: int | None = None) -> list[nn.Parameter]:
        """The LoRA weights of step k's adapter (both adapters when k is None); [] unless decoupling="lora"."""
        if self.decoupling != "lora":
            return []
        names = [f"step{k}"] if k is not None else [f"step{j}" for j in STEPS]
        return [p for n, p in self.shared.named_parameters()
                if ".lora_" in n and any(f".{name}." in n for name in names)]

    def _activate(self, k: int) -> None:
        """Make step k's adapter the active one, keeping every adapter's requires_grad flag as it was."""
        params = self.adapter_parameters()
        flags = [p.requires_grad for p in params]
        self.shared.set_adapter(f"step{k}")
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)

    def step_fn(self, k: int) -> ModelFn:
        """A `zray.sampling.ModelFn` for step k: `fn(x_BCHW, t_B, cap_feats) -> u_BCHW`."""
        module = self.transformer(k)
        if self.decoupling != "lora":
            return lambda x, t, cond: transformer_forward(module, x, t, cond)

        def fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            self._activate(k)
            return transformer_forward(module, x, t, cond)
        return fn

    def forward(self, noise_BCHW: torch.Tensor, cap_feats: Sequence[torch.Tensor], *,
                sigma_2: float = TURBO_SIGMA_2, detach_steps: bool = False,
                renoise_BCHW: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0_1, x_s2, x0_2) from `zray.sampling.two_step_sample` with this student's two step functions."""
        return two_step_sample(self.step_fn(1), self.step_fn(2), noise_BCHW, list(cap_feats), sigma_2=sigma_2,
                               detach_steps=detach_steps, renoise=renoise_BCHW)

    # ----------------------------------------------------------------------------- saving and loading

    def metadata(self) -> dict[str, Any]:
        return {"decoupling": self.decoupling, "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                "lora_targets": list(self.lora_targets)}

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the layout of the module docstring under `out_dir`; return it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.decoupling == "copies":
            self.step1.save_pretrained(str(out / "transformer_step1"))
            self.step2.save_pretrained(str(out / "transformer_step2"))
        elif self.decoupling == "shared":
            self.shared.save_pretrained(str(out / "transformer"))
        else:
            _trunk_without_adapters(self.shared).save_pretrained(str(out / "transformer"))
            for k in STEPS:
                self.shared.save_lora_adapter(str(out / f"lora_step{k}"), adapter_name=f"step{k}",
                                              weight_name=LORA_WEIGHT_NAME)
        write_text_atomic(out / META_FILE, json.dumps(self.metadata(), indent=1))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> TwoStepStudent:
        """A student saved by `save_pretrained`."""
        from diffusers import ZImageTransformer2DModel

        root = Path(path)
        if not (root / META_FILE).exists():
            raise FileNotFoundError(f"{str(root / META_FILE)!r} not found: expected a dir written by "
                                    "TwoStepStudent.save_pretrained")
        meta = json.loads((root / META_FILE).read_text())

        def load(name: str) -> nn.Module:
            return ZImageTransformer2DModel.from_pretrained(str(root / name), dtype=dtype)

        student = cls.__new__(cls)
        nn.Module.__init__(student)
        student._set_meta(meta["decoupling"], int(meta["lora_rank"]), float(meta["lora_alpha"]),
                          tuple(meta["lora_targets"]))
        if student.decoupling == "copies":
            student.step1 = load("transformer_step1").requires_grad_(True)
            student.step2 = load("transformer_step2").requires_grad_(True)
        elif student.decoupling == "shared":
            student.shared = load("transformer").requires_grad_(True)
        else:
            student.shared = load("transformer").requires_grad_(False)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                for k in STEPS:
                    student.shared.load_lora_adapter(str(root / f"lora_step{k}"), adapter_name=f"step{k}",
                                                      prefix=None, weight_name=LORA_WEIGHT_NAME)
            for p in student.adapter_parameters():
                p.requires_grad_(True)
        return student


def _trunk_without_adapters(model: nn.Module) -> nn.Module:
    """A `ZImageTransformer2DModel` holding `model`'s base weights (LoRA layers left out), sharing its tensors."""
    base_state = {n.replace(".base_layer.", "."): t for n, t in model.state_dict().items() if ".lora_" not in n}
    with torch.device("meta"):
        trunk = type(model).from_config(model.config)
    trunk.load_state_dict(base_state, assign=True, strict=True)
    return trunk


@torch.no_grad()
def sample_two_step_images(student: TwoStepStudent, pipe: Any, prompts: Sequence[str], noise_BCHW: torch.Tensor, *,
                           sigma_2: float = TURBO_SIGMA_2, batch_size: int = 50) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] of the student's two steps from `noise_BCHW`, with the text encoder and VAE
    of `pipe` (a `ZImagePipeline`), post-processed as the pipeline does it (no rounding)."""
    from zray.models.generator import encode_prompts, vae_decode

    if len(prompts) != noise_BCHW.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but noise has batch {noise_BCHW.shape[0]}: expected equal")
    out = []
    for i in range(0, len(prompts), batch_size):
        cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, list(prompts[i:i + batch_size]))
        x0 = student(noise_BCHW[i:i + batch_size], cond, sigma_2=sigma_2)[2]
        out.append((vae_decode(pipe.vae, x0).float() * 0.5 + 0.5).clamp(0, 1))
    return torch.cat(out)
