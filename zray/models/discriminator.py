"""The Turbo++ discriminator: LADD-style, on a frozen copy of the teacher's Z-Image transformer (methods.md §6).

    D(x0, c) = mean_k head_k( h_k( x_tau, t = 1 - tau, c ) )     (the K head logits with `per_block=True`)
    x_tau    = (1 - tau) x0 + tau eps,   tau ~ U(tau_range) per sample

where h_k are the image-token outputs of the transformer's main blocks `transformer.layers[k]` (k in
`blocks`), read with forward hooks, and head_k are small trainable heads giving one logit per sample. "Real"
latents are teacher outputs, "fake" the student's (the losses are `zray.losses.turbo`).

The transformer is frozen (`requires_grad_(False)`, eval mode) but stays in the graph: gradients flow through
its activations into the latents, which is how the generator's adversarial loss reaches the student. Only the
heads are trainable (`heads`; checkpoint them with `heads_state_dict`, the transformer is the teacher's). The
forward stops after the deepest requested block (the rest of the transformer and its final layer never run).

How Z-Image lays out a block's tokens (diffusers `ZImageTransformer2DModel.forward`, basic mode): each block
maps [B, S, D] -> [B, S, D] over one unified sequence per sample, `[image tokens, image padding, caption
tokens, caption padding]`; the image tokens come first, (H / p) x (W / p) of them in row-major order for a
latent of H x W and patch size p = 2. The heads read exactly those.

Tensor legend: B batch, C latent channels, H x W latent grid, N = h w image tokens on an h x w token grid,
D the transformer's width, S the unified sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from zray.sampling import model_time, noise_latents

HeadKind = Literal["conv", "linear"]
PATCH_SIZE = 2  # the pipeline always patchifies with patch size 2 (stack notes)


class _StopForward(Exception):
    """Raised by the deepest hook to end the transformer's forward early."""


class TokenHead(nn.Module):
    """One logit per sample from a block's image tokens [B, N, D] on an h x w grid.

    "linear": LayerNorm + Linear(D, 1) per token, averaged over tokens. "conv": LayerNorm, then over the token
    grid Conv3x3(D, hidden) + SiLU + Conv1x1(hidden, 1), averaged over the grid.
    """

    def __init__(self, dim: int, kind: HeadKind = "conv", hidden: int = 64) -> None:
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"kind={kind!r} is not allowed: expected 'conv' or 'linear'")
        if hidden < 1:
            raise ValueError(f"hidden={hidden} is not allowed: expected an integer >= 1")
        self.kind = kind
        self.norm = nn.LayerNorm(dim)
        if kind == "linear":
            self.out = nn.Linear(dim, 1)
        else:
            self.out = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, tokens_BND: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x_BND = self.norm(tokens_BND.float())
        if self.kind == "linear":
            return self.out(x_BND).squeeze(-1).mean(-1)
        h, w = grid
        x_BDhw = x_BND.transpose(1, 2).reshape(x_BND.shape[0], x_BND.shape[2], h, w)
        return self.out(x_BDhw).mean(dim=(1, 2, 3))


class LADDDiscriminator(nn.Module):
    """Frozen teacher transformer + trainable heads on the image tokens of `blocks` (see the module docstring).

    `transformer` is a `ZImageTransformer2DModel`; it is frozen in place (pass a copy to keep a trainable one).
    `blocks` index `transformer.layers` (negative indices count from the end). `tau_range = (lo, hi)` bounds
    the re-noising sigma, drawn uniformly per sample unless `forward` gets `tau_B`. The forward hooks belong to
    this instance: build a new discriminator rather than deep-copying one (a copy's `features` fails loudly).
    """

    def __init__(self, transformer: nn.Module, *, blocks: Sequence[int] = (0, -1),
                 tau_range: tuple[float, float] = (0.1, 0.9), head: HeadKind = "conv", head_hidden: int = 64) -> None:
        super().__init__()
        num_layers = len(transformer.layers)
        if not blocks:
            raise ValueError("blocks=() is not allowed: expected at least one index into transformer.layers")
        resolved = []
        for b in blocks:
            if not isinstance(b, int) or not -num_layers <= b < num_layers:
                raise ValueError(f"blocks={tuple(blocks)} is not allowed: expected indices in "
                                 f"[-{num_layers}, {num_layers}) (the transformer has {num_layers} layers)")
            resolved.append(b % num_layers)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"blocks={tuple(blocks)} is not allowed: expected distinct layers, got {resolved}")
        lo, hi = (float(v) for v in tau_range) if len(tau_range) == 2 else (None, None)
        if lo is None or not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"tau_range={tuple(tau_range)} is not allowed: expected (lo, hi) with 0 <= lo <= hi <= 1")
        self.blocks = tuple(resolved)
        self.tau_range = (lo, hi)
        self.transformer = transformer.requires_grad_(False).eval()
        dim = int(transformer.config.dim)
        self.heads = nn.ModuleList(TokenHead(dim, head, head_hidden) for _ in self.blocks)
        self._captured: dict[int, torch.Tensor] | None = None  # set only during `features`
        for b in self.blocks:
            transformer.layers[b].register_forward_hook(self._hook(b))

    def _hook(self, block: int):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            # inactive outside `features` (the teacher sampling, a checkpoint recompute), and on deep copies of the
            # transformer (a student copied from a teacher that carries these hooks)
            if self._captured is None or module is not self.transformer.layers[block]:
                return
            self._captured[block] = output
            if len(self._captured) == len(self.blocks):
                raise _StopForward
        return hook

    def train(self, mode: bool = True) -> LADDDiscriminator:
        """Heads follow `mode`; the frozen transformer stays in eval mode."""
        super().train(mode)
        self.transformer.eval()
        return self

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable part's weights (the transformer is the teacher's and is not saved)."""
        return self.heads.state_dict()

    def sample_tau(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B] re-noising sigmas, uniform in `tau_range`."""
        lo, hi = self.tau_range
        device = generator.device if generator is not None else "cpu"
        return lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)

    def features(self, x_BCHW: torch.Tensor, t_B: torch.Tensor,
                 cap_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The image tokens [B, N, D] of each block in `blocks` for inputs x at model time t (= 1 - sigma)."""
        if x_BCHW.ndim != 4 or x_BCHW.shape[2] % PATCH_SIZE or x_BCHW.shape[3] % PATCH_SIZE:
            raise ValueError(f"x has shape {tuple(x_BCHW.shape)}: expected (B, C, H, W) with H and W multiples "
                             f"of {PATCH_SIZE}")
        if len(cap_feats) != x_BCHW.shape[0]:
            raise ValueError(f"{len(cap_feats)} caption features for a batch of {x_BCHW.shape[0]}: expected one "
                             "[L, D_text] per sample")
        dtype = next(self.transformer.parameters()).dtype
        x_list = list(x_BCHW.to(dtype).unsqueeze(2).unbind(dim=0))  # [C, F=1, H, W] each
        num_tokens = (x_BCHW.shape[2] // PATCH_SIZE) * (x_BCHW.shape[3] // PATCH_SIZE)
        self._captured = {}
        try:
            self.transformer(x_list, t_B.to(dtype), list(cap_feats), return_dict=False)
        except _StopForward:
            pass
        finally:
            captured, self._captured = self._captured, None
        if len(captured) != len(self.blocks):
            raise RuntimeError(f"captured blocks {sorted(captured)} of {self.blocks}: the transformer's forward did "
                               "not run its main layers as expected")
        return [captured[b][:, :num_tokens] for b in self.blocks]

    def forward(self, x0_BCHW: torch.Tensor, cap_feats: Sequence[torch.Tensor], *, tau_B: torch.Tensor | None = None,
                noise_BCHW: torch.Tensor | None = None, generator: torch.Generator | None = None,
                per_block: bool = False) -> torch.Tensor:
        """logits [B]: re-noise x0 to tau (drawn from `tau_range` unless given) with `noise_BCHW` (drawn unless
        given, from `generator`), run the frozen transformer, average the heads' logits over the blocks.

        With `per_block`, the heads' logits [K, B] instead (K = len(blocks)): flattened to [K * B] they give
        LADD's per-head hinge losses, averaged, from the same `zray.losses.turbo` functions."""
        batch = x0_BCHW.shape[0]
        if tau_B is None:
            tau_B = self.sample_tau(batch, generator)
        tau_B = torch.as_tensor(tau_B, dtype=torch.float32).to(x0_BCHW.device)
        if tau_B.shape != (batch,):
            raise ValueError(f"tau_B has shape {tuple(tau_B.shape)}: expected ({batch},)")
        if noise_BCHW is None:
            device = generator.device if generator is not None else x0_BCHW.device
            noise_BCHW = torch.randn(x0_BCHW.shape, generator=generator, device=device)
        x_tau = noise_latents(x0_BCHW.float(), noise_BCHW.to(x0_BCHW.device, torch.float32), tau_B)
        feats = self.features(x_tau, model_time(tau_B), cap_feats)
        grid = (x0_BCHW.shape[2] // PATCH_SIZE, x0_BCHW.shape[3] // PATCH_SIZE)
        logits_KB = torch.stack([head(f, grid) for head, f in zip(self.heads, feats, strict=True)])
        return logits_KB if per_block else logits_KB.mean(0)
