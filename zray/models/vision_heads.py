"""Vision supervision of a tiny VLM: a warm-up of the vision tower before captioning, and the same heads as an
auxiliary loss during captioning.

Real VLMs start from a pre-trained vision encoder (and are trained on grounding data); ours is random.
Captioning alone teaches it slowly: the language model first learns the caption grammar and the background (a
global colour) and, for thousands of steps, emits the majority count and almost no right colour, because the
only signal reaching the vision tower passes through near-uniform attention over the image tokens (measured:
colour 2-5% after 2,400 steps, every lr and schedule tried). So the tower gets direct supervision, from two
heads on its output tokens (the merged tokens the language model reads):

- scene head: multi-label attributes of the image from the tokens max-pooled per image (features first, then
  the linear head): colours present, shapes present, (colour, shape) combinations present, the number of
  objects (1-3) and the background. Pooling the features (not the per-token logits) matters: with max-pooled
  logits a probe never learnt which shapes are present (set accuracy 0-16% after 4,000 steps); with pooled
  features the same tower reached 87% in 4 minutes.
- object-map head: for every image token, the (colour, shape) of each object whose centre lies in that token's
  cell of the image (a grounding target: where each object is and what it is, which is what the numbered
  object lines and counts of a caption need).

- cover head (only with cover_weight > 0): for every image token, the (colour, shape) of each object that covers
  part of its cell (at least COVER_MIN of the cell's area, from the object's own rasterised shape). The object
  map marks an object on its centre cell only, which trains the other tokens an object covers towards "nothing
  here"; the cover target tells every token what its part of the image shows.

Loss: BCE(scene) + map_weight * BCE(map) [+ cover_weight * BCE(cover)], each per-token BCE summed over the
(colour, shape) pairs and averaged over the tokens (`vision_loss`). `VisionWarmupTask` trains the tower on
it alone (phase 1 of `zray pretrain-vlm`); `CaptionTask` adds it to the caption loss with `vision_aux_weight`
(zray/tasks/caption.py). The saved model is the whole VLM (Hugging Face format, heads dropped); the heads are
kept in `vision_heads/heads.safetensors` beside it (a subdirectory, so vLLM serves the dir as it is), and a
resumed run and the captioning phase continue from them.

Shape legend: B images, N image tokens per image (side x side, row-major), D hidden size, A scene attributes,
P (colour, shape) pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from zray.data.layout import radius
from zray.data.render import shape_polygon
from zray.data.scene import BACKGROUNDS, COLORS, SHAPES, Scene
from zray.models.vlm import load_vlm_weights, save_vlm

# In a subdirectory: vLLM loads every top-level *.safetensors file of a model dir as model weights.
HEAD_FILE = "vision_heads/heads.safetensors"
ATTRIBUTES: tuple[str, ...] = (
    *(f"colour:{c}" for c in COLORS), *(f"shape:{s}" for s in SHAPES),
    *(f"object:{c} {s}" for c in COLORS for s in SHAPES), *(f"count:{n}" for n in (1, 2, 3)),
    *(f"background:{b}" for b in BACKGROUNDS),
)
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
_INDEX = {name: i for i, name in enumerate(ATTRIBUTES)}
_PAIR_INDEX = {pair: i for i, pair in enumerate(PAIRS)}


def attribute_targets(scene: Scene) -> torch.Tensor:
    """y_A: 1 for every attribute of `scene` (see ATTRIBUTES), 0 elsewhere."""
    y = torch.zeros(len(ATTRIBUTES))
    for o in scene.objects:
        for name in (f"colour:{o.color}", f"shape:{o.shape}", f"object:{o.color} {o.shape}"):
            y[_INDEX[name]] = 1.0
    y[_INDEX[f"count:{len(scene.objects)}"]] = 1.0
    y[_INDEX[f"background:{scene.background}"]] = 1.0
    return y


def object_map_targets(scene: Scene, side: int) -> torch.Tensor:
    """m_NP (N = side^2, row-major cells of the image): 1 where an object of pair P has its centre in cell N."""
    m = torch.zeros(side * side, len(PAIRS))
    for o in scene.objects:
        row, col = min(max(int(o.y * side), 0), side - 1), min(max(int(o.x * side), 0), side - 1)
        m[row * side + col, _PAIR_INDEX[(o.color, o.shape)]] = 1.0
    return m


COVER_MIN = 1 / 16  # of a cell's area: the least an object must cover for the cover target to name it there
_COVER_CELL_PX = 16  # raster pixels per cell side for the cover target (any image size)


def object_cover_targets(scene: Scene, side: int) -> torch.Tensor:
    """c_NP (N = side^2, row-major cells): 1 where an object of pair P covers at least COVER_MIN of cell N.

    Each object's own shape (as drawn, occlusion ignored) is rasterised on a side * 16 pixel grid."""
    from PIL import Image, ImageDraw

    raster, c = side * _COVER_CELL_PX, torch.zeros(side * side, len(PAIRS))
    for o in scene.objects:
        mask = Image.new("L", (raster, raster), 0)
        draw, poly = ImageDraw.Draw(mask), shape_polygon(o, raster)
        if poly is None:
            cx, cy, r = o.x * raster, o.y * raster, radius(o) * raster
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        else:
            draw.polygon(poly, fill=1)
        cells = torch.tensor(np.asarray(mask), dtype=torch.float32).view(side, _COVER_CELL_PX, side, _COVER_CELL_PX)
        covered = cells.mean(dim=(1, 3)).flatten() >= COVER_MIN
        c[covered, _PAIR_INDEX[(o.color, o.shape)]] = 1.0
    return c


def token_grid_side(image_grid_thw: torch.Tensor, merge: int) -> int:
    """The side of the (square) grid of merged image tokens; every image of a batch must have the same grid."""
    grids = {(int(t), int(h) // merge, int(w) // merge) for t, h, w in image_grid_thw.tolist()}
    t, h, w = next(iter(grids))
    if len(grids) != 1 or t != 1 or h != w:
        raise ValueError(f"image_grid_thw={image_grid_thw.tolist()} is not allowed: vision supervision needs "
                         "single square images of one size per batch")
    return h


VISION_TARGET_KEYS = ("attribute_targets", "object_maps", "object_cover")  # what `vision_targets` may add


def vision_targets(scene_jsons: Any, image_grid_thw: torch.Tensor, merge: int,
                   cover: bool = False) -> dict[str, torch.Tensor]:
    """{'attribute_targets': y_BA, 'object_maps': m_BNP} of the rows' scenes, and 'object_cover': c_BNP if
    `cover`."""
    side = token_grid_side(image_grid_thw, merge)
    scenes = [Scene.from_json(str(s)) for s in scene_jsons]
    out = {"attribute_targets": torch.stack([attribute_targets(s) for s in scenes]),
           "object_maps": torch.stack([object_map_targets(s, side) for s in scenes])}
    if cover:
        out["object_cover"] = torch.stack([object_cover_targets(s, side) for s in scenes])
    return out


def visual_tokens(output: Any, num_images: int) -> torch.Tensor:
    """tokens_BND: the merged image tokens of the vision tower's output, per image."""
    tokens = output.pooler_output if hasattr(output, "pooler_output") else output  # (B * N, D)
    return tokens.view(num_images, -1, tokens.shape[-1])


class HeadLogits(NamedTuple):
    """The heads' logits on tokens_BND: scene_BA, object map_BNP and, with a cover head, cover_BNP (else None)."""

    scene_BA: torch.Tensor
    map_BNP: torch.Tensor
    cover_BNP: torch.Tensor | None


def vision_loss(logits: HeadLogits, batch: dict[str, torch.Tensor], map_weight: float,
                cover_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L = BCE(scene) + map_weight * BCE(map) + cover_weight * BCE(cover); the per-token BCEs summed over the pairs
    and averaged over the tokens. cover_weight > 0 needs the cover logits and batch['object_cover']."""
    scene_BA, map_BNP = logits.scene_BA.float(), logits.map_BNP.float()
    y_BA, m_BNP = batch["attribute_targets"].float(), batch["object_maps"].float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    scene_loss = bce(scene_BA, y_BA)
    map_loss = bce(map_BNP, m_BNP, reduction="none").sum(-1).mean()
    with torch.no_grad():
        exact = ((scene_BA > 0) == (y_BA > 0.5)).all(dim=1).float().mean()
        cells = ((map_BNP > 0) == (m_BNP > 0.5)).all(dim=2).all(dim=1).float().mean()
    total = scene_loss + map_weight * map_loss
    info = {"scene_loss": float(scene_loss.detach()), "map_loss": float(map_loss.detach()),
            "attribute_exact": float(exact), "object_map_exact": float(cells)}
    if cover_weight:
        if logits.cover_BNP is None:
            raise ValueError(f"cover_weight={cover_weight} needs VisionHeads built with cover=True")
        cover_loss = bce(logits.cover_BNP.float(), batch["object_cover"].float(), reduction="none").sum(-1).mean()
        total = total + cover_weight * cover_loss
        info["cover_loss"] = float(cover_loss.detach())
    return total, info


class VisionHeads(torch.nn.Module):
    """Scene head (on max-pooled tokens), object-map head and, if `cover`, cover head (per token)."""

    def __init__(self, hidden: int, cover: bool = False) -> None:
        super().__init__()
        self.scene = torch.nn.Linear(hidden, len(ATTRIBUTES))
        self.objects = torch.nn.Linear(hidden, len(PAIRS))
        self.cover = torch.nn.Linear(hidden, len(PAIRS)) if cover else None

    def forward(self, tokens_BND: torch.Tensor) -> HeadLogits:
        return HeadLogits(self.scene(tokens_BND.amax(dim=1)), self.objects(tokens_BND),
                          self.cover(tokens_BND) if self.cover is not None else None)

    def loss(self, tokens_BND: torch.Tensor, batch: dict[str, torch.Tensor], map_weight: float,
             cover_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """`vision_loss` of these heads on tokens_BND, for an unwrapped model; a training task calls the
        `VisionProbe` (its forward runs the heads) and takes `vision_loss` of its output."""
        return vision_loss(self(tokens_BND), batch, map_weight, cover_weight)


class ProbeOutput(NamedTuple):
    """What `VisionProbe.forward` returns: the merged image tokens_BND, the heads' logits on them, and the VLM's
    output (`lm.logits`) when the forward was given the language model's inputs (else None)."""

    tokens_BND: torch.Tensor
    heads: HeadLogits
    lm: Any = None


class VisionProbe(torch.nn.Module):
    """The VLM plus `VisionHeads` on its vision tower's output tokens.

    Tasks call the probe itself (never `probe.vlm` or `probe.heads`): under DDP the model a task gets is the
    DistributedDataParallel wrapper, which has no such attributes, and whose gradient synchronisation expects
    every parameter to be used inside its forward.
    """

    def __init__(self, vlm: torch.nn.Module, cover: bool = False) -> None:
        super().__init__()
        self.vlm = vlm
        self.heads = VisionHeads(vlm.config.text_config.hidden_size, cover=cover)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **lm_inputs: Any) -> ProbeOutput:
        """With the images alone: the vision tower alone (`lm` None). With the language model's inputs too
        (input_ids, attention_mask, ..., use_cache, logits_to_keep: keyword arguments of the VLM's forward): one
        VLM forward, whose vision tower output a forward hook captures. The heads run on those tokens either way."""
        num_images = image_grid_thw.shape[0]
        if not lm_inputs:
            tokens = visual_tokens(self.vlm.model.visual(pixel_values, grid_thw=image_grid_thw), num_images)
            return ProbeOutput(tokens, self.heads(tokens))
        captured: list[torch.Tensor] = []
        hook = self.vlm.model.visual.register_forward_hook(
            lambda _m, _i, out: captured.append(visual_tokens(out, num_images)))
        try:
            lm = self.vlm(pixel_values=pixel_values, image_grid_thw=image_grid_thw, **lm_inputs)
        finally:
            hook.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the VLM ran its vision tower {len(captured)} times in one forward; expected once")
        return ProbeOutput(captured[0], self.heads(captured[0]), lm)

    def save(self, model_dir: str | Path, out_dir: Path) -> None:
        """The VLM in Hugging Face format (with `model_dir`'s processor) and the heads in HEAD_FILE."""
        from safetensors.torch import save_file

        out = save_vlm(self.vlm, model_dir, out_dir)
        (out / HEAD_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, str(out / HEAD_FILE))

    def load(self, ckpt_dir: str | Path, vlm: bool = True) -> None:
        """Load the heads of `ckpt_dir` (and the VLM, if `vlm`); strict."""
        from safetensors.torch import load_file

        if vlm:
            load_vlm_weights(self.vlm, ckpt_dir)
        path = Path(ckpt_dir) / HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{ckpt_dir}: no {HEAD_FILE} (the vision heads of a warm-up or captioning run)")
        self.heads.load_state_dict(load_file(str(path)))
