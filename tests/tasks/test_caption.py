"""Captioning task: answer-only labels, per-attribute scoring, loss falls in a short run, HF round trip."""

import re

import numpy as np
import pytest
import torch

from zray.config import VLMConfig, WorldConfig
from zray.data import build_world, read_table
from zray.data.captions import describe, format_description, parse_description, restyle
from zray.data.scene import Defects, Relation, Scene, SceneObject
from zray.evaluation.captions import caption_metrics, caption_slices, describe_images, score_caption
from zray.tasks.caption import LOSS_WEIGHTS, CaptionTask, position_digits
from zray.models.tiny import build_tiny_vlm
from zray.models.vlm import load_vlm

TEACHER = VLMConfig(arch="qwen2_5_vl", hidden_size=64, num_heads=1, num_kv_heads=1, head_dim=64, num_layers=2,
                    intermediate_size=128, seed=1)
STUDENT = VLMConfig(arch="qwen3_vl", hidden_size=64, num_heads=1, num_kv_heads=1, head_dim=64, num_layers=1,
                    intermediate_size=128, seed=2)
TWO = Scene("white", (SceneObject("circle", "red", "large", 0.30, 0.50),
                      SceneObject("square", "blue", "small", 0.72, 0.48)), relation=Relation(0, "left of", 1))
THREE = Scene("gray", (SceneObject("star", "green", "small", 0.2, 0.3), SceneObject("star", "green", "large", 0.5, 0.7),
                       SceneObject("triangle", "orange", "small", 0.8, 0.3)))


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_vlms")
    return {name: str(build_tiny_vlm(cfg, root / name)) for name, cfg in (("teacher", TEACHER), ("student", STUDENT))}


@pytest.fixture(scope="module")
def caption_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("caption_world")
    build_world(WorldConfig(seed=5, num_train_prompts=4, num_test_prompts=2, num_heldout_prompts=2,
                            candidates_per_prompt=2, num_caption_images=96, num_caption_test_images=8,
                            num_generator_images=2, num_generator_test_prompts=2), out, progress=False)
    return read_table(out / "captions_train.parquet", "captions").to_pydict()


def _numpy_batch(rows, start, size):
    return {k: np.array(v[start:start + size], dtype=object) for k, v in rows.items()}


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("style", ["compact", "canonical"])
def test_collate_labels_only_the_assistant_answer(vlm_dirs, caption_rows, role, style):
    task = CaptionTask(model_dir=vlm_dirs[role], style=style)
    batch = task.collate(_numpy_batch(caption_rows, 0, 3))
    tokenizer = task.processor.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 3
    assert len({int(n) for n in mask.sum(1)}) > 1  # rows of different lengths: padding is present
    for b in range(3):
        trained = labels[b] != -100
        answer = restyle(caption_rows["description"][b], style)
        assert tokenizer.decode(ids[b][trained]) == answer + "<|im_end|>"
        assert torch.equal(labels[b][trained], ids[b][trained])
        positions = trained.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))  # one contiguous span
        before = tokenizer.decode(ids[b][:positions[0]])
        assert before.endswith("Describe the image.<|im_end|>\n<|im_start|>assistant\n")
        assert not trained[mask[b] == 0].any()  # padding is never trained
    assert int((ids == task.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 3 * 16


@pytest.mark.parametrize("style", ["compact", "canonical"])
def test_row_lengths_follow_the_answer_token_counts(vlm_dirs, caption_rows, style):
    task = CaptionTask(model_dir=vlm_dirs["student"], style=style)
    rows = _numpy_batch(caption_rows, 0, 24)
    lengths = task.row_lengths(rows)
    tokens = (task.collate(rows)["labels"] != -100).sum(dim=1).numpy()
    assert lengths.shape == (24,)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(ranks(lengths), ranks(tokens))[0, 1] > 0.9


def test_compact_style_round_trips():
    canonical = describe(THREE, Defects(blur=0.8))
    compact = restyle(canonical, "compact")
    assert "at (" not in compact and len(compact) < len(canonical)
    desc = parse_description(compact)  # strict
    assert format_description(desc, "compact") == compact
    assert [(o.size, o.color, o.shape, o.x) for o in desc.objects] == [
        ("small", "green", "star", None), ("large", "green", "star", None), ("small", "orange", "triangle", None)]
    assert desc.relation_triples() == parse_description(canonical).relation_triples()
    mixed = compact.replace("1: small green star", "1: small green star at (20, 30)")
    with pytest.raises(ValueError, match="mixed styles"):
        parse_description(mixed)
    with pytest.raises(ValueError, match="style"):
        restyle(canonical, "terse")


def test_perfect_description_gets_every_attribute():
    for style in ("canonical", "compact"):
        for scene in (TWO, THREE):
            scored = score_caption(restyle(describe(scene), style), scene)
            assert all(scored[k] for k in ("background", "colour", "shape", "count", "exact"))
            assert scored["relation"] is (True if scene.relation else None)


def test_wrong_colour_loses_only_colour():
    text = describe(THREE).replace("orange", "purple")
    scored = score_caption(text, THREE)
    assert scored["colour"] is False and scored["exact"] is False
    assert scored["background"] and scored["shape"] and scored["count"] and scored["relation"] is None


def test_other_attributes_and_relations():
    truth = describe(TWO, Defects(blur=0.8))
    assert score_caption(truth.replace("white", "black"), TWO)["background"] is False
    assert score_caption(truth.replace("blue square", "blue circle"), TWO)["shape"] is False
    swapped = truth.replace("a red circle and a blue square", "a blue circle and a red square")
    swapped = swapped.replace("large red circle", "large blue circle").replace("small blue square", "small red square")
    scored = score_caption(swapped, TWO)  # colours and shapes right as multisets, wrong pairing
    assert scored["colour"] and scored["shape"] and scored["count"] and not scored["exact"]
    wrong_relation = score_caption(truth.replace("1 left of 2", "none"), TWO)
    assert wrong_relation["relation"] is False and wrong_relation["exact"] is False and wrong_relation["colour"]
    assert score_caption(truth, TWO, Defects(blur=0.8))["defects"] is True
    assert score_caption(truth, TWO, Defects(noise=0.8))["defects"] is False
    nothing = score_caption("I do not know", TWO)
    assert not any(nothing[k] for k in ("background", "colour", "shape", "count", "relation", "exact"))


def test_caption_metrics_aggregates():
    metrics = caption_metrics([describe(TWO), describe(THREE).replace("orange", "purple")], [TWO, THREE])
    assert metrics["background"] == 1.0 and metrics["colour"] == 0.5 and metrics["exact"] == 0.5
    assert metrics["relation"] == 1.0 and metrics["num_relation_images"] == 1.0 and metrics["num_images"] == 2.0
    with pytest.raises(ValueError, match="predictions"):
        caption_metrics(["x"], [TWO, THREE])


def test_caption_slices_show_where_descriptions_fail():
    blur = Defects(blur=0.8)
    rows = caption_slices([describe(TWO), describe(THREE, blur).replace("2: large green star", "2: large green circle")
                           .replace("two green stars", "a green circle and a green star")],
                          [TWO, THREE], [Defects(), blur])
    by = {r["slice"]: r for r in rows}
    assert [r["slice"] for r in rows] == ["all", "2 objects", "3 objects", "objects sharing a colour", "clean",
                                          "degraded"]
    assert by["all"]["images"] == 2 and by["all"]["shape"] == 0.5 and by["all"]["count"] == 1.0
    assert by["objects sharing a colour"]["shape"] == 0.0 == by["degraded"]["exact"]
    assert by["clean"]["shape"] == 1.0 == by["2 objects"]["exact"]
    with pytest.raises(ValueError, match="caption_slices"):
        caption_slices(["x"], [TWO, THREE], [Defects()])


def test_loss_decreases_and_model_round_trips(vlm_dirs, caption_rows, tmp_path, one_torch_thread):
    torch.manual_seed(0)
    task = CaptionTask(model_dir=vlm_dirs["student"], style="compact")
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(36):
        loss, metrics = task.loss(model, task.collate(_numpy_batch(caption_rows, (step * 8) % 96, 8)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"])
    first, last = float(np.mean(losses[:4])), float(np.mean(losses[-4:]))
    assert last < 0.6 * first, f"loss went from {first:.3f} to {last:.3f}"

    task.save_pretrained(model, tmp_path / "hf")
    loaded, processor = load_vlm(tmp_path / "hf")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))

    from zray.data.render import decode_png

    images = [decode_png(b) for b in caption_rows["image"][:3]]
    texts = describe_images(loaded, processor, images, max_new_tokens=12, batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert processor.tokenizer.padding_side == "left"  # restored


@pytest.mark.parametrize(("role", "cover"), [("teacher", 0.0), ("student", 0.0), ("student", 0.3)])
def test_vision_aux_loss_adds_the_heads_loss_on_the_tokens_the_lm_reads(vlm_dirs, caption_rows, tmp_path, role,
                                                                       cover, one_torch_thread):
    from zray.models.vision_heads import HEAD_FILE, VisionProbe, vision_loss

    torch.manual_seed(0)
    task = CaptionTask(model_dir=vlm_dirs[role], vision_aux_weight=0.5, map_weight=2.0, cover_weight=cover)
    model = task.build_model()
    assert isinstance(model, VisionProbe) and (model.heads.cover is not None) == (cover > 0)
    batch = task.collate(_numpy_batch(caption_rows, 0, 4))
    assert ("object_cover" in batch) == (cover > 0)
    loss, metrics = task.loss(model, batch)
    caption_only, _ = CaptionTask(model_dir=vlm_dirs[role]).loss(model.vlm, batch)
    vision, _ = vision_loss(model(batch["pixel_values"], batch["image_grid_thw"]).heads, batch, 2.0, cover)
    assert float(loss.detach()) == pytest.approx(float(caption_only) + 0.5 * float(vision), rel=1e-5)
    assert metrics["caption_loss"] == pytest.approx(float(caption_only), rel=1e-5) and metrics["map_loss"] > 0
    loss.backward()
    assert model.heads.objects.weight.grad.abs().sum() > 0

    task.save_pretrained(model, tmp_path / "hf")
    assert (tmp_path / "hf" / HEAD_FILE).is_file()
    # vLLM loads every top-level *.safetensors file as model weights: only the model's may be there
    assert all(p.name.startswith("model") for p in (tmp_path / "hf").glob("*.safetensors"))
    loaded, _ = load_vlm(tmp_path / "hf")  # the VLM alone, Hugging Face format
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.vlm.state_dict().values(),
                                                 strict=True))
    resumed = CaptionTask(model_dir=str(tmp_path / "hf"), vision_aux_weight=0.5,
                          cover_weight=cover).build_model()  # heads from the file
    assert torch.equal(resumed.heads.objects.weight, model.heads.objects.weight)


def test_position_digits_are_the_written_positions_only(vlm_dirs, caption_rows):
    task = CaptionTask(model_dir=vlm_dirs["student"], style="canonical")
    batch = task.collate(_numpy_batch(caption_rows, 0, 4))
    marked = position_digits(batch["input_ids"], task.processor.tokenizer)
    for b in range(4):
        caption = restyle(caption_rows["description"][b], "canonical")
        expected = "".join(x + y for x, y in re.findall(r"\((\d+), (\d+)\)", caption))
        # exactly the positions' digits: object numbers ("1: ...") and relation indices ("1 left of 2") are not
        assert expected and task.processor.tokenizer.decode(batch["input_ids"][b][marked[b]]) == expected
        assert not marked[b][batch["labels"][b] == -100].any()  # nothing in the prompt


@pytest.mark.parametrize("role", ["teacher", "student"])  # Qwen2.5-VL and Qwen3-VL
def test_position_weight_weights_the_digit_losses(vlm_dirs, caption_rows, one_torch_thread, role):
    """Also checks the loss against the full logits: the task runs the LM head on the answer positions only."""
    torch.manual_seed(0)
    plain = CaptionTask(model_dir=vlm_dirs[role], style="canonical")
    weighted = CaptionTask(model_dir=vlm_dirs[role], style="canonical", position_weight=0.25)
    model = plain.build_model()
    rows = _numpy_batch(caption_rows, 0, 4)
    batch, wbatch = plain.collate(rows), weighted.collate(rows)
    assert LOSS_WEIGHTS not in batch
    digits = position_digits(batch["input_ids"], plain.processor.tokenizer)
    assert torch.equal(wbatch[LOSS_WEIGHTS], torch.where(digits, 0.25, 1.0))

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        target = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        trained, digit = target != -100, digits[:, 1:]
        w = torch.where(digit, 0.25, 1.0) * trained
        loss_plain, _ = plain.loss(model, batch)
        loss_weighted, info = weighted.loss(model, wbatch)
    assert float(loss_plain) == pytest.approx(float(ce[trained].mean()), rel=1e-5)
    assert float(loss_weighted) == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)
    assert 0 < int(digit[trained].sum()) < int(trained.sum())  # both kinds of tokens are weighed
    assert info["answer_tokens"] == float(trained.sum())


@pytest.mark.parametrize("weight", [-0.5, float("nan")])
def test_bad_position_weight_is_refused(vlm_dirs, weight):
    with pytest.raises(ValueError, match="CaptionTask.position_weight"):
        CaptionTask(model_dir=vlm_dirs["student"], position_weight=weight)


@pytest.mark.parametrize(("role", "cover"), [("teacher", 0.0), ("student", 0.3)])  # Qwen2.5-VL, Qwen3-VL
def test_vision_aux_loss_goes_through_a_ddp_wrapper(vlm_dirs, caption_rows, tmp_path, role, cover, one_torch_thread,
                                                    plain_then_ddp):
    task = CaptionTask(model_dir=vlm_dirs[role], vision_aux_weight=0.5, cover_weight=cover)
    batch = task.collate(_numpy_batch(caption_rows, 0, 2))
    model, (loss, metrics, grads), wrapped = plain_then_ddp(task, batch, tmp_path)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}  # the heads and the whole VLM
    for ddp_loss, ddp_metrics, ddp_grads in wrapped:
        assert ddp_loss == pytest.approx(loss, rel=1e-6)
        assert ddp_metrics == pytest.approx(metrics, rel=1e-6)
        assert set(ddp_grads) == set(grads)
        for name in grads:
            torch.testing.assert_close(ddp_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    task.save_pretrained(model, tmp_path / "hf")  # the learner saves the unwrapped model
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
