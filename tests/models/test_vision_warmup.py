"""Vision warm-up task: attribute targets, a loss that decreases, and a save/load round trip with its head."""

import numpy as np
import pytest
import torch

from zray.data.scene import Scene
from zray.models.vision_warmup import (ATTRIBUTES, HEAD_FILE, PAIRS, VisionWarmupTask, attribute_targets,
                                       object_map_targets, token_grid_side)


def _scene():
    return Scene.from_json('{"background": "black", "objects": [{"color": "red", "shape": "star", "size": "small", '
                           '"x": 0.3, "y": 0.5}, {"color": "blue", "shape": "star", "size": "large", "x": 0.7, '
                           '"y": 0.5}], "relation": null}')


def test_attribute_targets_name_exactly_the_scene():
    y = attribute_targets(_scene())
    on = {ATTRIBUTES[i] for i in torch.nonzero(y).flatten().tolist()}
    assert on == {"colour:red", "colour:blue", "shape:star", "object:red star", "object:blue star", "count:2",
                  "background:black"}


def test_object_map_marks_each_object_centre_cell():
    m = object_map_targets(_scene(), 4)  # centres (0.3, 0.5) -> row 2, col 1; (0.7, 0.5) -> row 2, col 2
    on = {(cell, PAIRS[p]) for cell, p in torch.nonzero(m).tolist()}
    assert on == {(2 * 4 + 1, ("red", "star")), (2 * 4 + 2, ("blue", "star"))}


def test_token_grid_side_refuses_mixed_grids():
    assert token_grid_side(torch.tensor([[1, 8, 8], [1, 8, 8]]), 2) == 4
    with pytest.raises(ValueError, match="image_grid_thw"):
        token_grid_side(torch.tensor([[1, 8, 8], [1, 4, 8]]), 2)


def test_loss_decreases_and_round_trip(tiny_zoo, tmp_path):
    from zray.data.render import render_scene

    task = VisionWarmupTask(model_dir=str(tiny_zoo["teacher"]["path"]))
    torch.manual_seed(0)
    model = task.build_model()
    buf = __import__("io").BytesIO()
    render_scene(_scene(), 64).save(buf, format="PNG")
    rows = {"image": np.array([buf.getvalue()] * 4, dtype=object), "scene_json": np.array([_scene().to_json()] * 4)}
    batch = task.collate(rows)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, metrics = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert 0.0 <= metrics["attribute_exact"] <= 1.0 and metrics["map_loss"] > 0
    assert batch["object_maps"].shape == (4, 16, len(PAIRS))
    task.save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / HEAD_FILE).exists() and (tmp_path / "out" / "config.json").exists()
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "out")
    with torch.no_grad():
        tokens = model(batch["pixel_values"], batch["image_grid_thw"])
        assert torch.allclose(fresh(batch["pixel_values"], batch["image_grid_thw"]), tokens, atol=1e-5)
        for mine, theirs in zip(fresh.heads(tokens), model.heads(tokens), strict=True):
            assert torch.allclose(mine, theirs, atol=1e-6)
