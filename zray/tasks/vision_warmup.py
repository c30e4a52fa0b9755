"""Phase 1 of `zray pretrain-vlm`: the vision tower alone, trained on the scene attributes and object map of
each caption image (`zray.models.vision_heads`: the heads, their targets and their loss)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zray.data.render import decode_png
from zray.models.vision_heads import VisionProbe, vision_targets
from zray.models.vlm import cached_processor, trainable_vlm


@dataclass(frozen=True, kw_only=True)
class VisionWarmupTask:
    """A `LearnerTask`; rows need the captions table's `image` (PNG bytes) and `scene_json` columns."""

    model_dir: str
    name: str = "vision_warmup"
    map_weight: float = 0.4
    cover_weight: float = 0.0  # > 0 adds the cover head and its loss

    def build_model(self) -> torch.nn.Module:
        return VisionProbe(trainable_vlm(self.model_dir), cover=self.cover_weight > 0).train()

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = [decode_png(bytes(b)) for b in rows["image"]]
        processor = cached_processor(str(self.model_dir))
        pixels = processor.image_processor(images=images, return_tensors="pt")
        merge = int(processor.image_processor.merge_size)
        return {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
                **vision_targets(rows["scene_json"], pixels["image_grid_thw"], merge, cover=self.cover_weight > 0)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return model.heads.loss(model(batch["pixel_values"], batch["image_grid_thw"]), batch, self.map_weight,
                                self.cover_weight)

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        model.save(self.model_dir, out_dir)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        model.load(ckpt_dir)
