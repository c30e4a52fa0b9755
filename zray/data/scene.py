"""The Shapes world's vocabulary and scene data model (../shared/spec/shapes-world.md).

A scene is a background colour plus 1 to 3 objects; an object has a shape, a colour, a size and a position.
Positions are object centres in normalised image coordinates ([0, 1] x [0, 1], y downwards), so a scene
renders at any resolution. Everything here is plain data: sampling lives in `world.py`, pixels in
`render.py`, and the inverse (pixels -> scene) in `judge.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any


# RGB values are chosen far apart so that classical colour classification recovers them after blur/noise.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Object size as the radius of its bounding circle, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.17}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height (0 = top)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"SceneObject.shape={self.shape!r} is not allowed: expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"SceneObject.color={self.color!r} is not allowed: expected one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"SceneObject.size={self.size!r} is not allowed: expected one of {tuple(SIZES)}")


@dataclass(frozen=True)
class Relation:
    """`objects[subject]` is `predicate` `objects[reference]` (e.g. 0 'left of' 1)."""

    subject: int
    predicate: str
    reference: int

    def __post_init__(self) -> None:
        if self.predicate not in RELATIONS:
            raise ValueError(f"Relation.predicate={self.predicate!r} is not allowed: expected one of {RELATIONS}")

    def holds(self, objects: tuple[SceneObject, ...]) -> bool:
        """Whether the predicate holds between the two objects' centres (strict comparison)."""
        a, b = objects[self.subject], objects[self.reference]
        return {
            "left of": a.x < b.x,
            "right of": a.x > b.x,
            "above": a.y < b.y,
            "below": a.y > b.y,
        }[self.predicate]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background={self.background!r} is not allowed: expected one of {tuple(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"Scene.objects has {len(self.objects)} objects: expected 1 to 3")

        if self.relation is not None:
            for index in (self.relation.subject, self.relation.reference):
                if not 0 <= index < len(self.objects):
                    raise ValueError(f"Scene.relation index {index} is out of range for {len(self.objects)} objects")
            if self.relation.subject == self.relation.reference:
                raise ValueError(f"Scene.relation relates object {self.relation.subject} to itself")

    def counts(self) -> dict[tuple[str, str], int]:
        """(colour, shape) -> number of such objects; the content a prompt describes."""
        out: dict[tuple[str, str], int] = {}
        for obj in self.objects:
            out[(obj.color, obj.shape)] = out.get((obj.color, obj.shape), 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "objects": [asdict(obj) for obj in self.objects],
            "relation": None if self.relation is None else asdict(self.relation),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Inverse of `to_dict`; raises ValueError (naming the key) on a malformed dict."""
        try:
            objects = tuple(SceneObject(**obj) for obj in data["objects"])
            relation = None if data.get("relation") is None else Relation(**data["relation"])
            return cls(background=data["background"], objects=objects, relation=relation)
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed scene dict: {err!r}") from err

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace), so equal scenes give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"scene JSON does not parse: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"scene JSON is a {type(data).__name__}, expected an object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class Defects:
    """Degradations applied on top of a scene's render, each a severity in [0, 1] (0 = absent)."""

    noise: float = 0.0  # realism
    banding: float = 0.0  # realism
    blotches: float = 0.0  # realism
    blur: float = 0.0  # aesthetics
    off_centre: float = 0.0  # aesthetics (composition shifted to one side)
    cramped: float = 0.0  # aesthetics (objects squeezed together)
    clashing: float = 0.0  # aesthetics (palette pushed to clash with the background)
    cut_by_frame: float = 0.0  # plausibility
    interpenetrating: float = 0.0  # plausibility
    floating_shadow: float = 0.0  # plausibility

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"Defects.{f.name}={value!r} is not allowed: expected a severity in [0, 1]")

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Defects:
        unknown = set(data) - set(DEFECT_DIMENSION)
        if unknown:
            raise ValueError(f"unknown defect names {sorted(unknown)}: expected some of {tuple(DEFECT_DIMENSION)}")
        return cls(**data)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Defects:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"defects JSON does not parse: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"defects JSON is a {type(data).__name__}, expected an object")
        return cls.from_dict(data)

    def present(self) -> dict[str, float]:
        """The defects with a non-zero severity, in field order."""
        return {name: value for name, value in self.to_dict().items() if value > 0.0}


# Which rubric dimension each degradation lowers (alignment is lowered by scene deviations, not by these).
DEFECT_DIMENSION: dict[str, str] = {
    "noise": "realism",
    "banding": "realism",
    "blotches": "realism",
    "blur": "aesthetics",
    "off_centre": "aesthetics",
    "cramped": "aesthetics",
    "clashing": "aesthetics",
    "cut_by_frame": "plausibility",
    "interpenetrating": "plausibility",
    "floating_shadow": "plausibility",
}
# Layout defects move objects (realised in `layout.py`); the others act on pixels (`render.py`).
LAYOUT_DEFECTS: tuple[str, ...] = ("off_centre", "cramped", "cut_by_frame", "interpenetrating")
