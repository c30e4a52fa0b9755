"""Vision warm-up task: attribute targets, a loss that decreases, and a save/load round trip with its head."""

import numpy as np
import pytest
import torch

from zray.data.scene import Scene
from zray.models.vision_heads import (ATTRIBUTES, HEAD_FILE, PAIRS, VisionHeads, attribute_targets,
                                      object_cover_targets, object_map_targets, token_grid_side)
from zray.tasks.vision_warmup import VisionWarmupTask


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


def test_object_cover_marks_every_cell_an_object_covers():
    scene = Scene.from_json('{"background": "white", "objects": [{"color": "green", "shape": "circle", "size": '
                            '"large", "x": 0.5, "y": 0.5}, {"color": "red", "shape": "square", "size": "small", '
                            '"x": 0.125, "y": 0.125}], "relation": null}')
    cover, centre = object_cover_targets(scene, 4), object_map_targets(scene, 4)
    covered = {PAIRS[p]: sorted(cell for cell, q in torch.nonzero(cover).tolist() if q == p) for p in range(len(PAIRS))}
    # the large circle (radius 11 of 64 px) at the centre covers the four middle cells; the small square sits in
    # the corner cell
    assert {k: v for k, v in covered.items() if v} == {("green", "circle"): [5, 6, 9, 10], ("red", "square"): [0]}
    assert sorted(torch.nonzero(centre)[:, 0].tolist()) == [0, 10]  # the map marks the circle's centre cell only
    assert object_cover_targets(scene, 5).shape == (25, len(PAIRS))


def test_cover_loss_adds_its_weighted_term(tiny_zoo):
    from zray.data.render import render_scene

    task = VisionWarmupTask(model_dir=str(tiny_zoo["teacher"]["path"]), map_weight=0.4, cover_weight=0.5)
    torch.manual_seed(0)
    model = task.build_model()
    buf = __import__("io").BytesIO()
    render_scene(_scene(), 64).save(buf, format="PNG")
    batch = task.collate({"image": np.array([buf.getvalue()] * 2, dtype=object),
                          "scene_json": np.array([_scene().to_json()] * 2)})
    assert torch.equal(batch["object_cover"][0], object_cover_targets(_scene(), 4))
    with torch.no_grad():
        tokens = model(batch["pixel_values"], batch["image_grid_thw"]).tokens_BND
        total, info = task.loss(model, batch)
        without, _ = model.heads.loss(tokens, batch, 0.4)
    assert info["cover_loss"] > 0
    assert float(total) == pytest.approx(float(without) + 0.5 * info["cover_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="cover_weight=0.5 needs VisionHeads built with cover=True"):
        VisionHeads(tokens.shape[-1]).loss(tokens, batch, 0.4, 0.5)


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
        tokens = model(batch["pixel_values"], batch["image_grid_thw"]).tokens_BND
        assert torch.allclose(fresh(batch["pixel_values"], batch["image_grid_thw"]).tokens_BND, tokens, atol=1e-5)
        mine, theirs = fresh.heads(tokens), model.heads(tokens)
        assert mine.cover_BNP is None and theirs.cover_BNP is None
        assert torch.allclose(mine.scene_BA, theirs.scene_BA, atol=1e-6)
        assert torch.allclose(mine.map_BNP, theirs.map_BNP, atol=1e-6)


@pytest.mark.parametrize(("role", "cover"), [("teacher", 0.5), ("student", 0.0)])  # Qwen2.5-VL, Qwen3-VL
def test_loss_goes_through_a_ddp_wrapper(tiny_zoo, tmp_path, role, cover, plain_then_ddp):
    from zray.data.render import render_scene

    task = VisionWarmupTask(model_dir=str(tiny_zoo[role]["path"]), cover_weight=cover)
    buf = __import__("io").BytesIO()
    render_scene(_scene(), 64).save(buf, format="PNG")
    batch = task.collate({"image": np.array([buf.getvalue()] * 2, dtype=object),
                          "scene_json": np.array([_scene().to_json()] * 2)})
    model, (loss, metrics, grads), wrapped = plain_then_ddp(task, batch, tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable and any(n.startswith("heads.") for n in trainable)
    assert all(n.startswith(("heads.", "vlm.model.visual.")) for n in trainable)  # the tower and the heads only
    for ddp_loss, ddp_metrics, ddp_grads in wrapped:
        assert ddp_loss == pytest.approx(loss, rel=1e-6) and ddp_metrics == pytest.approx(metrics, rel=1e-6)
        assert set(ddp_grads) == trainable
        for name in grads:
            torch.testing.assert_close(ddp_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    task.save_pretrained(model, tmp_path / "out")
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
