"""Phase 1 of `zray pretrain-vlm`: the vision tower alone, trained on the scene attributes and object map of
each caption image (`zray.models.vision_heads`: the heads, their targets and their loss)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zray.data.render import decode_png
from zray.models.vision_heads import VisionProbe, vision_loss, vision_targets
from zray.models.vlm import cached_processor, trainable_vlm


def freeze_beyond_the_tower(vlm: torch.nn.Module) -> None:
    """requires_grad=False on the VLM's parameters that the vision tower's output tokens do not depend on: the
    language model, its head and (Qwen3-VL) the vision tower's deepstack mergers, whose features only feed the
    language model's layers. Under DDP a trainable parameter that gets no gradient fails the next step."""
    for name, param in vlm.named_parameters():
        if not name.startswith("model.visual.") or ".deepstack_merger_list." in name:
            param.requires_grad_(False)


@dataclass(frozen=True, kw_only=True)
class VisionWarmupTask:
    """A `LearnerTask`; rows need the captions table's `image` (PNG bytes) and `scene_json` columns."""

    model_dir: str
    name: str = "vision_warmup"
    map_weight: float = 0.4
    cover_weight: float = 0.0  # > 0 adds the cover head and its loss

    def build_model(self) -> torch.nn.Module:
        """The `VisionProbe`, trainable where the warm-up's loss reaches only (`freeze_beyond_the_tower`)."""
        probe = VisionProbe(trainable_vlm(self.model_dir), cover=self.cover_weight > 0).train()
        freeze_beyond_the_tower(probe.vlm)
        return probe

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = [decode_png(bytes(b)) for b in rows["image"]]
        processor = cached_processor(str(self.model_dir))
        pixels = processor.image_processor(images=images, return_tensors="pt")
        merge = int(processor.image_processor.merge_size)
        return {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
                **vision_targets(rows["scene_json"], pixels["image_grid_thw"], merge, cover=self.cover_weight > 0)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """`vision_loss` of the heads' logits; one forward of `model` (the `VisionProbe` or a DDP / DeepSpeed wrapper
        of it), on the images alone."""
        out = model(batch["pixel_values"], batch["image_grid_thw"])
        return vision_loss(out.heads, batch, self.map_weight, self.cover_weight)

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        model.save(self.model_dir, out_dir)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        model.load(ckpt_dir)
