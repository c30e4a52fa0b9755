"""Kept Turbo++ references: reused only for the same inputs, never from a cut or foreign file."""

import json
import os

import numpy as np
from PIL import Image

from zray.evaluation.turbo_references import REFERENCES_IMAGES, REFERENCES_JSON, load_references, reference_key, \
    save_references

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a red circle"]


def _teacher(tmp_path):
    teacher = tmp_path / "teacher"
    (teacher / "transformer").mkdir(parents=True)
    (teacher / "model_index.json").write_text("{}")
    (teacher / "transformer" / "model.safetensors").write_bytes(b"weights")
    return teacher


def _key(teacher, prompts=PROMPTS, **changes):
    kwargs = {"seed": 1, "steps": 8, "shift": 3.0, "image_size": 32, "judged": True, **changes}
    return reference_key(teacher, prompts, **kwargs)


def _images(seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]


def _save(root, key):
    references = {"teacher": {"metrics": {"main_colour": 0.815, "steps": 8}, "alignment": [1.0, 2.0, 1.5]},
                  "two_step": {"metrics": {"main_colour": 0.625, "steps": 2}, "alignment": [1.0, 1.0, 0.5]}}
    images = {"teacher": _images(0), "two_step": _images(1)}
    save_references(root, key, references, images, PROMPTS)
    return references, images


def test_saved_references_come_back_exactly_for_the_same_key(tmp_path):
    teacher = _teacher(tmp_path)
    references, images = _save(tmp_path, _key(teacher))
    kept = load_references(tmp_path, _key(teacher), PROMPTS)
    assert kept is not None
    got, got_images = kept
    assert got == references
    for k in ("teacher", "two_step"):  # PNG is lossless: the same pixels
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got_images[k], images[k]))


def test_the_key_follows_every_input(tmp_path, monkeypatch):
    from zray.evaluation import turbo_references

    teacher = _teacher(tmp_path)
    key = _key(teacher)
    assert _key(teacher) == key
    others = [_key(teacher, PROMPTS[::-1]), _key(teacher, seed=2), _key(teacher, steps=4), _key(teacher, shift=1.0),
              _key(teacher, image_size=64), _key(teacher, judged=False)]
    assert key not in others and len(set(others)) == len(others)
    weights = teacher / "transformer" / "model.safetensors"
    weights.write_bytes(b"retrained")  # another size
    assert _key(teacher) != key
    key = _key(teacher)
    code = turbo_references.code_fingerprint()
    assert set(code) == {*turbo_references.CODE_MODULES, "torch", "diffusers"}
    monkeypatch.setattr(turbo_references, "code_fingerprint", lambda: {**code, "zray.data.judge": "changed"})
    assert _key(teacher) != key  # another judge: judged again
    monkeypatch.undo()
    stat = weights.stat()
    key = _key(teacher)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same size, rewritten later
    assert _key(teacher) != key


def test_nothing_is_reused_from_a_changed_cut_or_foreign_record(tmp_path):
    teacher = _teacher(tmp_path)
    key = _key(teacher)
    assert load_references(tmp_path, key, PROMPTS) is None  # nothing saved yet
    _save(tmp_path, key)
    assert load_references(tmp_path, _key(teacher, seed=2), PROMPTS) is None  # other inputs
    assert load_references(tmp_path, key, PROMPTS[:2]) is None  # other prompts than the images were drawn for

    images = (tmp_path / REFERENCES_IMAGES).read_bytes()
    (tmp_path / REFERENCES_IMAGES).write_bytes(images[: len(images) // 2])  # a cut file
    assert load_references(tmp_path, key, PROMPTS) is None
    _save(tmp_path, key)
    record = json.loads((tmp_path / REFERENCES_JSON).read_text())
    del record["key"]  # a record written before keys
    (tmp_path / REFERENCES_JSON).write_text(json.dumps(record))
    assert load_references(tmp_path, key, PROMPTS) is None
    (tmp_path / REFERENCES_JSON).write_text('{"key": ')  # cut JSON
    assert load_references(tmp_path, key, PROMPTS) is None
    _save(tmp_path, key)
    assert load_references(tmp_path, key, PROMPTS) is not None
