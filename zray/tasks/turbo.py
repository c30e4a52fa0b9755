"""Turbo++ distillation as a learner task (`TurboTask`, methods.md §6): the two-step student against the 8-step
teacher, with alternating discriminator updates.

The learner trains the student (`zray.models.turbo.TwoStepStudent`, its parameters in the learner's optimizer).
The discriminator (`zray.models.discriminator.LADDDiscriminator` on the frozen teacher transformer) lives in the
task, in each worker, with its own AdamW on the heads (`TurboConfig.disc_lr`); the task is a `StatefulTask`, so
the heads and their optimizer state travel in every checkpoint and a resumed run continues exactly. Per learner
step (one micro batch):

1. the student samples from the batch's noise with gradient: x0_1, x_s2, x0_2 (`two_step_sample`);
2. `disc_steps_per_gen_step` discriminator updates: hinge loss on real latents vs the detached x0_2, per head
   (LADD), heads' gradients averaged over ranks, clipped, stepped;
3. the generator loss through the (now frozen) heads and the frozen transformer:
   `L_G = lam_adv L_adv(x0_2) + lam_1(step) L_1 + lam_reg ||x0_2 - x0_T||^2` (`zray.losses.turbo`), returned for
   the learner's backward and step.

Real data (`TurboConfig.real_data`): "teacher": the teacher's outputs for the same prompts, from the same noise
when precomputed; "renders": the world's reference renders of the prompts, VAE-encoded (rows of a prompt list,
`zray.data.imported.prompt_rows`, have none: refused). Teacher samples
(`teacher_samples`): "online" runs the 8-step teacher in `collate` from fresh noise each step; "latents" reads
rows of `zray.data.teacher_samples` (the student starts from the stored noise seed); "images" reads the same rows
but encodes the stored teacher images with the VAE as the real data.

Tensor legend: B batch, C latent channels, H x W latent grid, L prompt tokens, D text hidden size, K heads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zray.config import TurboConfig
from zray.data.teacher_samples import latents_from_bytes, noise_batch
from zray.losses.turbo import (adversarial_loss, decayed_weight, discriminator_hinge_loss, regression_loss,
                               step1_regression_loss)
from zray.models.generator import (DEFAULT_MAX_SEQUENCE_LENGTH, decode_images, encode_prompts,
                                   pad_embeddings, transformer_fn, unpad_embeddings, unwrap_module, vae_encode)
from zray.models.turbo import TwoStepStudent
from zray.sampling import flow_sigmas, sample

DISC_BETAS = (0.0, 0.99)  # GAN-style Adam for the heads: no first-moment lag between alternating updates
_OPT_KEYS = ("exp_avg", "exp_avg_sq", "step")


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """`module`'s parameters with requires_grad False inside the block (restored after)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class TurboTask:
    """Train a `TwoStepStudent` from the teacher pipeline at `pipeline_dir` (see the module docstring)."""

    name = "turbo"

    def __init__(self, pipeline_dir: str | Path, turbo: TurboConfig, *, teacher_samples: str = "latents",
                 image_size: int = 64, disc_grad_clip: float = 1.0,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> None:
        if teacher_samples not in ("online", "latents", "images"):
            raise ValueError(f"teacher_samples={teacher_samples!r} is not allowed: expected 'online', 'latents' "
                             "or 'images'")
        self.pipeline_dir = str(pipeline_dir)
        self.turbo = turbo
        self.teacher_samples = teacher_samples
        self.image_size = image_size
        self.disc_grad_clip = disc_grad_clip
        self.max_sequence_length = max_sequence_length
        self._parts: dict[str, Any] | None = None  # per worker: frozen encoders, teacher, discriminator, its AdamW
        self._cache: dict[str, torch.Tensor] = {}  # prompt -> embedding; image id -> latent

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parts": None, "_cache": {}}

    # ----------------------------------------------------------------------------- worker-side parts

    def parts(self) -> dict[str, Any]:
        """The frozen VAE, text encoder, tokenizer and teacher transformer, loaded once per process."""
        if self._parts is None:
            from diffusers import AutoencoderKL, ZImageTransformer2DModel
            from transformers import AutoModel, AutoTokenizer

            root = Path(self.pipeline_dir)
            self._parts = {
                "vae": AutoencoderKL.from_pretrained(str(root / "vae"), dtype=torch.float32).eval(),
                "text_encoder": AutoModel.from_pretrained(str(root / "text_encoder"), dtype=torch.float32).eval(),
                "tokenizer": AutoTokenizer.from_pretrained(str(root / "tokenizer")),
                "teacher": ZImageTransformer2DModel.from_pretrained(str(root / "transformer"), dtype=torch.float32),
                "gen_steps": 0,
            }
            for key in ("vae", "text_encoder", "teacher"):
                self._parts[key].requires_grad_(False).eval()
        return self._parts

    def build_model(self) -> torch.nn.Module:
        """The student (from the teacher); also builds this worker's discriminator and its optimizer."""
        from zray.models.discriminator import LADDDiscriminator

        t = self.turbo
        parts = self.parts()
        student = TwoStepStudent(parts["teacher"], decoupling=t.decoupling, lora_rank=t.lora_rank,
                                 lora_alpha=t.lora_alpha or None)
        disc = LADDDiscriminator(parts["teacher"], blocks=t.disc_blocks, tau_range=tuple(t.disc_tau_range),
                                 head=t.disc_head, head_hidden=t.disc_head_hidden)
        parts["disc"] = disc.train()
        parts["disc_opt"] = torch.optim.AdamW(disc.heads.parameters(), lr=t.disc_lr, betas=DISC_BETAS,
                                              weight_decay=0.0, foreach=False)
        parts["gen_steps"] = 0
        return student.train()

    # ----------------------------------------------------------------------------- data

    def _embeddings(self, prompts: list[str]) -> list[torch.Tensor]:
        todo = sorted({p for p in prompts if f"prompt:{p}" not in self._cache})
        if todo:
            parts = self.parts()
            with torch.no_grad():
                embeds = encode_prompts(parts["text_encoder"], parts["tokenizer"], todo, self.max_sequence_length)
            for p, e in zip(todo, embeds, strict=True):
                self._cache[f"prompt:{p}"] = e.clone()
        return [self._cache[f"prompt:{p}"] for p in prompts]

    def _encoded(self, ids: list[str], images: Any) -> torch.Tensor:
        """VAE latents of PNG images (posterior mean), cached by id (renders and stored teacher images)."""
        todo = [k for k, i in enumerate(ids) if f"image:{i}" not in self._cache]
        if todo:
            with torch.no_grad():
                latents = vae_encode(self.parts()["vae"], decode_images([images[k] for k in todo]))
            for j, k in enumerate(todo):
                self._cache[f"image:{ids[k]}"] = latents[j].clone()
        return torch.stack([self._cache[f"image:{i}"] for i in ids])

    @torch.no_grad()
    def _teacher_online(self, noise: torch.Tensor, cond: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent after teacher_mid_steps, final latent) of the teacher from `noise`."""
        t = self.turbo
        x0, trajectory = sample(transformer_fn(self.parts()["teacher"]), noise,
                                flow_sigmas(t.teacher_steps, t.teacher_shift), cond, return_trajectory=True)
        return trajectory[t.teacher_mid_steps], x0

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        prompts = [str(p) for p in rows["prompt"]]
        embeds = self._embeddings(prompts)
        if self.teacher_samples == "online":
            noise = torch.randn(len(prompts), *self._latent_chw())  # the worker's seeded stream (kept on resume)
            teacher_mid, teacher_x0 = self._teacher_online(noise, embeds)
        else:
            missing = [c for c in ("noise_seed", "latent_shape", "teacher_mid", "teacher_x0") if c not in rows]
            if missing:
                raise KeyError(f"teacher_samples={self.teacher_samples!r} needs rows of zray.data.teacher_samples: "
                               f"missing column {missing[0]!r}")
            shape = tuple(int(v) for v in rows["latent_shape"][0])
            noise = noise_batch(rows["noise_seed"], shape)
            teacher_mid = latents_from_bytes(rows["teacher_mid"], shape)
            teacher_x0 = latents_from_bytes(rows["teacher_x0"], shape)
        if self.turbo.real_data == "renders":
            ids = [str(i) for i in rows["image_id"]]
            renders = rows.get("render" if "render" in rows else "image")
            if renders is None or any(r is None for r in renders):
                raise ValueError("turbo.real_data='renders' is not allowed for these rows: they carry no world render "
                                 "(a prompt list, data.dir); expected real_data='teacher'")
            real = self._encoded(ids, renders)
        elif self.teacher_samples == "images":
            real = self._encoded([str(i) for i in rows["sample_id"]], rows["teacher_image"])
        else:
            real = teacher_x0
        cap, cap_len = pad_embeddings(embeds)
        return {"noise": noise, "cap": cap, "cap_len": cap_len, "teacher_mid": teacher_mid,
                "teacher_x0": teacher_x0, "real": real}

    def _latent_chw(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents at `image_size`, as `ZImagePipeline.prepare_latents` makes them."""
        parts = self.parts()
        factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)  # the pipeline's vae_scale_factor
        if self.image_size % (2 * factor):
            raise ValueError(f"image_size={self.image_size} is not allowed: expected a multiple of {2 * factor}")
        side = self.image_size // factor
        return int(parts["teacher"].config.in_channels), side, side

    # ----------------------------------------------------------------------------- losses

    def _disc_update(self, real: torch.Tensor, fake: torch.Tensor, cap: list[torch.Tensor]) -> dict[str, float]:
        """One hinge update of the heads (per head, LADD), gradients averaged over ranks; returns its metrics."""
        parts = self.parts()
        disc, opt = parts["disc"], parts["disc_opt"]
        real_KB = disc(real.float(), cap, per_block=True)
        fake_KB = disc(fake.detach().float(), cap, per_block=True)
        loss, metrics = discriminator_hinge_loss(real_KB.flatten(), fake_KB.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        heads = [p for p in disc.heads.parameters() if p.grad is not None]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in heads:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= dist.get_world_size()
        if self.disc_grad_clip > 0:
            metrics["d_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(heads, self.disc_grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return metrics

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.turbo
        parts = self.parts()
        cap = unpad_embeddings(batch["cap"], batch["cap_len"])
        renoise = torch.randn_like(batch["noise"]) if t.renoise == "fresh" else None
        x0_1, x_s2, x0_2 = model(batch["noise"], cap, sigma_2=t.sigma_2, detach_steps=t.detach_steps,
                                 renoise_BCHW=renoise)
        metrics: dict[str, float] = {}
        for _ in range(t.disc_steps_per_gen_step):
            metrics.update(self._disc_update(batch["real"], x0_2, cap))
        disc = parts["disc"]
        lam_1 = decayed_weight(parts["gen_steps"], t.lam_1, t.lam_1_decay_steps)
        with _frozen(disc.heads):
            adv, m = adversarial_loss(disc(x0_2, cap, per_block=True).flatten())
            metrics.update(m)
            total = t.lam_adv * adv
            if t.step1_loss == "regression":
                l1, m = step1_regression_loss(x_s2, batch["teacher_mid"])
            elif t.step1_loss == "adversarial":
                l1, m = adversarial_loss(disc(x0_1, cap, per_block=True).flatten())
                m = {"step1_loss": m["adv_loss"]}
            else:
                l1, m = x_s2.new_zeros(()), {}
            metrics.update(m)
            total = total + lam_1 * l1
            if t.lam_reg > 0:
                reg, m = regression_loss(x0_2, batch["teacher_x0"], "paired")
                metrics.update(m)
                total = total + t.lam_reg * reg
        with torch.no_grad():  # how far the student's output is from the teacher's (same noise when paired)
            metrics["x0_mse_to_teacher"] = float((x0_2.float() - batch["teacher_x0"].float()).square().mean())
        metrics["lam_1"] = lam_1
        parts["gen_steps"] += 1
        return total, metrics

    # ----------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        """The student in `TwoStepStudent.save_pretrained` layout (diffusers format)."""
        unwrap_module(model, TwoStepStudent).save_pretrained(out_dir)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        student = unwrap_module(model, TwoStepStudent)
        loaded = TwoStepStudent.from_pretrained(ckpt_dir)
        if loaded.decoupling != student.decoupling:
            raise ValueError(f"checkpoint {str(ckpt_dir)!r} holds a {loaded.decoupling!r} student: expected "
                             f"decoupling={student.decoupling!r}")
        student.load_state_dict(loaded.state_dict(), strict=True)

    def task_state(self) -> dict[str, torch.Tensor]:
        """The discriminator heads, their AdamW moments and the generator-step counter (for lam_1's decay)."""
        parts = self.parts()
        state = {f"heads.{k}": v.detach().clone() for k, v in parts["disc"].heads.state_dict().items()}
        opt = parts["disc_opt"]
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for key, value in opt.state.get(p, {}).items():
                state[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().clone()
        state["gen_steps"] = torch.tensor(parts["gen_steps"], dtype=torch.int64)
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        parts = self.parts()
        heads = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
        parts["disc"].heads.load_state_dict(heads, strict=True)
        opt = parts["disc_opt"]
        for i, p in enumerate(opt.param_groups[0]["params"]):
            saved = {key: state[f"opt.{i}.{key}"] for key in _OPT_KEYS if f"opt.{i}.{key}" in state}
            if saved:
                opt.state[p] = {key: v.clone().to(p.device) for key, v in saved.items()}
        parts["gen_steps"] = int(state["gen_steps"])
