"""The generator under reward-gradient fine-tuning (`RewardGenerator`): the base Z-Image transformer with its N-step
Euler sampler, or the Turbo++ two-step student, with LoRA adapters or all of its weights trainable.

    gen = RewardGenerator.from_dir("base", pipeline_dir, finetune="lora", lora_rank=8)       # N-step, shift s
    gen = RewardGenerator.from_dir("turbo", student_dir, finetune="full")                    # 1 -> sigma_2 -> 0
    x0_hat, fm = gen(noise_BCHW, cap_BLD, cap_len_B, first=k, last=k)   # gradient through step k only
    gen.save_pretrained(out_dir)                                         # diffusers formats, below

The forward is the truncated sampler of `zray.losses.refl.truncated_sample` (one module call per update, so a
DDP / DeepSpeed wrapper sees one forward). Optionally it also returns the flow-matching regulariser on clean
latents `fm_x0` (world renders, VAE-encoded): the base network at the task's sigmas `fm_sigma_B`; for the student,
each step network at its own sigma (1 and sigma_2), averaged. Every trainable parameter takes part in the forward
(a zero-weighted term touches those off the gradient path, e.g. step 1's copy when only step 2 takes gradient),
so DDP's reducer sees them all.

"finetune": "lora" adds one peft adapter ("reward") to each network that runs a step (the base transformer; the
student's two copies, or its shared network) and trains only the adapters (peft's init: B = 0, so training starts
at the generator as given); "full" trains the base transformer, or what the student trains (its copies, its
shared network, or, for a student with decoupling "lora", its step adapters). A student whose decoupling is
"lora" takes no second adapter: use "full".

Saved layout (`save_pretrained`; `reward_finetune.json` says which):
- base, lora: `pytorch_lora_weights.safetensors`, diffusers' pipeline LoRA format:
  `ZImagePipeline.from_pretrained(base).load_lora_weights(dir)` applies it;
- turbo, lora: `lora_step1.safetensors`, `lora_step2.safetensors` in the same format, for the transformer that
  runs that step (`pipe.load_lora_weights(dir, weight_name="lora_step1.safetensors")` for step 1); for a shared
  student both files hold the one adapter;
- base, full: the transformer (`ZImageTransformer2DModel.from_pretrained(dir)`);
- turbo, full: the student (`TwoStepStudent.from_pretrained(dir)`).

Tensor legend: B batch, C latent channels, H x W latent grid, L prompt tokens, D text hidden size.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zray.losses.refl import truncated_sample
from zray.models.generator import load_safetensors_into, transformer_forward, unpad_embeddings
from zray.models.turbo import DEFAULT_LORA_TARGETS, STEPS, TwoStepStudent
from zray.sampling import TURBO_SIGMA_2, flow_sigmas, flow_target, model_time, noise_latents
from zray.training.runs import write_text_atomic

GENERATOR_KINDS: tuple[str, ...] = ("base", "turbo")
FINETUNE_MODES: tuple[str, ...] = ("lora", "full")
ADAPTER = "reward"
META_FILE = "reward_finetune.json"
BASE_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name


def turbo_lora_file(k: int) -> str:
    return f"lora_step{k}.safetensors"


class RewardGenerator(nn.Module):
    """The base transformer (`kind="base"`) or a `TwoStepStudent` (`kind="turbo"`) as one trainable module (see the
    module docstring). `num_steps` and `shift` set the base sampler (`flow_sigmas`); `sigma_2` the student's."""

    def __init__(self, network: nn.Module, *, kind: str, finetune: str, lora_rank: int = 8,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
                 num_steps: int = 8, shift: float = 3.0, sigma_2: float = TURBO_SIGMA_2,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if kind not in GENERATOR_KINDS:
            raise ValueError(f"kind={kind!r} is not allowed: expected one of {GENERATOR_KINDS}")
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune={finetune!r} is not allowed: expected one of {FINETUNE_MODES}")
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r} is not allowed: expected an integer >= 1")
        if kind == "turbo" and not isinstance(network, TwoStepStudent):
            raise TypeError(f"kind='turbo' needs a TwoStepStudent, got {type(network).__name__}")
        if kind == "turbo" and finetune == "lora" and network.decoupling == "lora":
            raise ValueError("finetune='lora' is not allowed for a Turbo++ student with decoupling 'lora' (it trains "
                             "LoRA step adapters already): expected finetune='full', which trains those adapters")
        if not 0.0 < sigma_2 < 1.0:
            raise ValueError(f"sigma_2={sigma_2} is not allowed: expected a float in (0, 1)")
        self.kind, self.finetune = kind, finetune
        self.lora_rank, self.lora_alpha = lora_rank, float(lora_alpha or lora_rank)
        self.lora_targets = tuple(lora_targets)
        self._sigmas = (flow_sigmas(num_steps, shift) if kind == "base"
                        else torch.tensor([1.0, float(sigma_2), 0.0], dtype=torch.float32))
        self.shift, self.sigma_2 = float(shift), float(sigma_2)
        if kind == "base":
            self.transformer = network.requires_grad_(finetune == "full")
        else:
            self.student = network  # "full": what the student trains (TwoStepStudent sets its requires_grad)
            if finetune == "lora":
                network.requires_grad_(False)
        if finetune == "lora":
            from peft import LoraConfig

            config = LoraConfig(r=lora_rank, lora_alpha=self.lora_alpha, target_modules=list(self.lora_targets))
            for module in self.networks():
                module.add_adapter(config, adapter_name=ADAPTER)
                for name, p in module.named_parameters():
                    p.requires_grad_(f".{ADAPTER}." in name and ".lora_" in name)
        if gradient_checkpointing:
            for module in self.networks():
                module.enable_gradient_checkpointing()
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError(f"the {kind} generator has no trainable parameters (finetune={finetune!r})")

    @classmethod
    def from_dir(cls, kind: str, path: str | Path, **kwargs: Any) -> RewardGenerator:
        """`kind="base"`: the transformer of a `ZImagePipeline` folder; `"turbo"`: a `TwoStepStudent` folder."""
        path = Path(path)
        if kind == "base":
            from diffusers import ZImageTransformer2DModel

            if not (path / "transformer" / "config.json").is_file():
                raise FileNotFoundError(f"{str(path / 'transformer')!r} not found: expected a ZImagePipeline folder")
            network: nn.Module = ZImageTransformer2DModel.from_pretrained(str(path / "transformer"),
                                                                          dtype=torch.float32)
        elif kind == "turbo":
            network = TwoStepStudent.from_pretrained(path)
        else:
            raise ValueError(f"kind={kind!r} is not allowed: expected one of {GENERATOR_KINDS}")
        return cls(network, kind=kind, **kwargs)

    # ----------------------------------------------------------------------------------------- the sampler

    @property
    def num_steps(self) -> int:
        return self._sigmas.numel() - 1

    def sigmas(self) -> torch.Tensor:
        """[N + 1]: `flow_sigmas(N, shift)` for the base, [1, sigma_2, 0] for the student."""
        return self._sigmas.clone()

    def networks(self) -> list[nn.Module]:
        """The distinct networks that run the steps (one, or the student's two copies)."""
        if self.kind == "base":
            return [self.transformer]
        student = self.student
        return [student.step1, student.step2] if student.decoupling == "copies" else [student.shared]

    def step_fns(self) -> list[Any]:
        """One `zray.sampling.ModelFn` per step (`fn(x_BCHW, t_B, cap_feats) -> u_BCHW`)."""
        if self.kind == "base":
            return [lambda x, t, cond: transformer_forward(self.transformer, x, t, cond)] * self.num_steps
        return [self.student.step_fn(k) for k in STEPS]

    def _touch_all(self) -> torch.Tensor:
        """0 * (one element of every trainable parameter): a zero gradient for each, so DDP sees them all used."""
        return sum(p.reshape(-1)[0] for p in self.parameters() if p.requires_grad) * 0.0

    def forward(self, noise_BCHW: torch.Tensor, cap_BLD: torch.Tensor, cap_len_B: torch.Tensor, *, first: int,
                last: int, fm_x0_BCHW: torch.Tensor | None = None, fm_noise_BCHW: torch.Tensor | None = None,
                fm_sigma_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0_hat [B, C, H, W], the flow-matching MSE or None): gradient through steps first..last only."""
        cond = unpad_embeddings(cap_BLD, cap_len_B)
        fns = self.step_fns()
        x0_hat = truncated_sample(fns, self._sigmas, noise_BCHW, cond, first=first, last=last)
        if torch.is_grad_enabled():
            x0_hat = x0_hat + self._touch_all()
        if fm_x0_BCHW is None:
            return x0_hat, None
        if fm_noise_BCHW is None or fm_noise_BCHW.shape != fm_x0_BCHW.shape:
            raise ValueError("fm_noise_BCHW must have fm_x0_BCHW's shape")
        x0, eps = fm_x0_BCHW.float(), fm_noise_BCHW.float()
        target = flow_target(x0, eps)
        if self.kind == "base":
            if fm_sigma_B is None:
                raise ValueError("the base generator's flow-matching term needs fm_sigma_B (one sigma per sample)")
            pairs = [(fns[0], fm_sigma_B.float())]
        else:  # each step network at the sigma it runs at
            pairs = [(fn, torch.full((x0.shape[0],), float(s), device=x0.device))
                     for fn, s in zip(fns, self._sigmas[:-1].tolist())]
        fm = sum((fn(noise_latents(x0, eps, s), model_time(s), cond).float() - target).square().mean()
                 for fn, s in pairs) / len(pairs)
        return x0_hat, fm

    # ----------------------------------------------------------------------------------------- saving

    def metadata(self) -> dict[str, Any]:
        files = ([BASE_LORA_FILE] if self.kind == "base" else [turbo_lora_file(k) for k in STEPS]) \
            if self.finetune == "lora" else []
        return {"kind": self.kind, "finetune": self.finetune, "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha, "lora_targets": list(self.lora_targets), "lora_files": files,
                "sigmas": [round(float(s), 6) for s in self._sigmas], "shift": self.shift, "sigma_2": self.sigma_2}

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the layout of the module docstring under `out_dir`; return it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.finetune == "lora":
            from diffusers import ZImagePipeline
            from peft.utils import get_peft_model_state_dict

            modules = [self.transformer] if self.kind == "base" else [self.student.transformer(k) for k in STEPS]
            names = [BASE_LORA_FILE] if self.kind == "base" else [turbo_lora_file(k) for k in STEPS]
            for module, name in zip(modules, names, strict=True):
                state = {k: v.detach().float().contiguous() for k, v in
                         get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}
                ZImagePipeline.save_lora_weights(str(out), transformer_lora_layers=state, weight_name=name,
                                                 transformer_lora_adapter_metadata=module.peft_config[ADAPTER].to_dict())
        elif self.kind == "base":
            self.transformer.save_pretrained(str(out))
        else:
            self.student.save_pretrained(out)
        write_text_atomic(out / META_FILE, json.dumps(self.metadata(), indent=1))
        return out

    def load_finetuned(self, path: str | Path) -> None:
        """Load weights written by `save_pretrained` of a generator of the same kind and mode, in place."""
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{str(meta_path)!r} not found: expected a dir written by "
                                    "RewardGenerator.save_pretrained")
        meta = json.loads(meta_path.read_text())
        if (meta["kind"], meta["finetune"]) != (self.kind, self.finetune):
            raise ValueError(f"{str(path)!r} holds a {meta['kind']} generator fine-tuned with {meta['finetune']!r}: "
                             f"expected {self.kind} and {self.finetune!r}")
        if self.finetune == "lora":
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            modules = [self.transformer] if self.kind == "base" else [self.student.transformer(k) for k in STEPS]
            for module, name in zip(modules, meta["lora_files"], strict=True):
                state = {k.removeprefix("transformer."): v for k, v in load_file(str(path / name)).items()}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
                if result.unexpected_keys:
                    raise ValueError(f"{str(path / name)!r} does not fit: unexpected {result.unexpected_keys[:5]}")
        elif self.kind == "base":
            load_safetensors_into(self.transformer, path)
        else:
            loaded = TwoStepStudent.from_pretrained(path)
            self.student.load_state_dict(loaded.state_dict(), strict=True)
