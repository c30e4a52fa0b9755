"""Scene descriptions: the captioning corpus's target text, canonical and parseable.

One fact per line, a fixed key per line, in this order (example):

    background: white
    objects: two red circles and a blue square
    1: large red circle at (31, 52)
    2: small red circle at (70, 25)
    3: small blue square at (55, 78)
    relations: 1 left of 2; 1 below 2; 1 left of 3; 2 above 3
    defects: blur mild; noise severe

- `background`: the background colour name.
- `objects`: the (colour, shape) counts in the prompt grammar (`prompts.content_phrase`).
- one numbered line per object, numbered left to right (ties top to bottom): size, colour, shape and the
  centre as integer percentages of width and height.
- `relations`: for every pair i < j, "i left of j" when object j's centre is at least `REL_MIN` to the
  right, and "i above j" / "i below j" when at least `REL_MIN` apart vertically; "none" if no pair is.
- `defects`: each degradation with realised severity >= `VISIBLE_MIN`, in `Defects` field order, as
  "<name> mild" (< 0.5) or "<name> severe"; "none" if there is none.

Styles: `canonical` (above, the corpus's `description` column) and `compact`, the same text without the
" at (x, y)" of each object line (about a third fewer tokens: positions are two digit tokens each; the
relations still carry the layout, but a tiny captioning model then learns above/below from one word per pair
and got it wrong far more often, see docs/experiments.md, pretrain-vlm):

    background: white
    objects: two red circles and a blue square
    1: large red circle
    2: small red circle
    3: small blue square
    relations: 1 left of 2; 1 below 2; 1 left of 3; 2 above 3
    defects: blur mild; noise severe

`parse_description` reads both (a compact object line parses with x = y = None); `restyle(text, style)`
turns a canonical description into the other style.

Per-attribute evaluation of a generated description compares `background`, `counts` (colour, shape and
count at once), the object lines, `relations` (via `relation_triples`) and `defects` field by field;
`parse_description(text, strict=False)` keeps whatever lines parse so one bad line costs one attribute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zray.data.layout import REL_MIN
from zray.data.prompt_grammar import Combo, canonical_groups, content_phrase, parse_content
from zray.data.scene import BACKGROUNDS, COLORS, DEFECT_DIMENSION, RELATIONS, SHAPES, SIZES, Defects, Scene

VISIBLE_MIN = 0.05
SEVERE_MIN = 0.5
LEVELS = ("mild", "severe")
KEYS = ("background", "objects", "relations", "defects")
STYLES = ("canonical", "compact")


@dataclass(frozen=True)
class DescribedObject:
    size: str
    color: str
    shape: str
    x: float | None  # centre, fraction of width (percent / 100); None in the compact style
    y: float | None


@dataclass(frozen=True)
class Description:
    """A parsed (or computed) description; a field is None when its line is absent or did not parse."""

    background: str | None
    groups: tuple[tuple[int, str, str], ...] | None  # the `objects:` line, canonical order
    objects: tuple[DescribedObject, ...]
    relations: tuple[tuple[int, str, int], ...] | None  # 0-based object indices
    defects: tuple[tuple[str, str], ...] | None  # (name, level)

    def counts(self) -> dict[Combo, int] | None:
        return None if self.groups is None else {(c, s): n for n, c, s in self.groups}

    def relation_triples(self) -> set[tuple[Combo, str, Combo]]:
        """Relations with objects named by (colour, shape); also the inverse predicates."""
        inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        out = set()
        for i, predicate, j in self.relations or ():
            if max(i, j) < len(self.objects):
                a, b = self.objects[i], self.objects[j]
                out.add(((a.color, a.shape), predicate, (b.color, b.shape)))
                out.add(((b.color, b.shape), inverse[predicate], (a.color, a.shape)))
        return out


def severity_level(severity: float) -> str:
    return "severe" if severity >= SEVERE_MIN else "mild"


def description_of(scene: Scene, defects: Defects | None = None) -> Description:
    """The description of a drawn scene (positions rounded to whole percentages)."""
    ordered = sorted(scene.objects, key=lambda o: (o.x, o.y))
    objects = tuple(DescribedObject(o.size, o.color, o.shape, round(o.x * 100) / 100, round(o.y * 100) / 100)
                    for o in ordered)
    relations = []
    for i, a in enumerate(ordered):
        for j in range(i + 1, len(ordered)):
            b = ordered[j]
            if b.x - a.x >= REL_MIN:
                relations.append((i, "left of", j))
            if b.y - a.y >= REL_MIN:
                relations.append((i, "above", j))
            elif a.y - b.y >= REL_MIN:
                relations.append((i, "below", j))
    present = (defects or Defects()).to_dict()
    visible = tuple((name, severity_level(v)) for name, v in present.items() if v >= VISIBLE_MIN)
    return Description(background=scene.background, groups=canonical_groups(scene.counts()), objects=objects,
                       relations=tuple(relations), defects=visible)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"caption style={style!r} is not allowed: expected one of {STYLES}")


def format_description(desc: Description, style: str = "canonical") -> str:
    """The text of a description in `style` ('canonical': with object positions; 'compact': without)."""
    _check_style(style)
    if style == "canonical" and any(o.x is None or o.y is None for o in desc.objects):
        raise ValueError("a description without object positions has no canonical text: use style='compact'")
    lines = [f"background: {desc.background}", f"objects: {content_phrase(desc.groups)}"]
    for k, o in enumerate(desc.objects, start=1):
        where = "" if style == "compact" else f" at ({round(o.x * 100)}, {round(o.y * 100)})"
        lines.append(f"{k}: {o.size} {o.color} {o.shape}{where}")
    rel = "; ".join(f"{i + 1} {p} {j + 1}" for i, p, j in desc.relations) or "none"
    lines.append(f"relations: {rel}")
    lines.append("defects: " + ("; ".join(f"{n} {lv}" for n, lv in desc.defects) or "none"))
    return "\n".join(lines)


def describe(scene: Scene, defects: Defects | None = None) -> str:
    """The canonical description text of a drawn scene and its realised defects."""
    return format_description(description_of(scene, defects))


def restyle(text: str, style: str) -> str:
    """A canonical description (strictly parsed) rewritten in `style`."""
    _check_style(style)
    return text if style == "canonical" else format_description(parse_description(text), style)


_OBJECT = re.compile(r"(\d+): ([a-z]+) ([a-z]+) ([a-z]+)(?: at \((-?\d+), (-?\d+)\))?")
_RELATION = re.compile(r"(\d+) (" + "|".join(RELATIONS) + r") (\d+)")


def _parse_object(line: str) -> tuple[int, DescribedObject]:
    m = _OBJECT.fullmatch(line)
    if m is None:
        raise ValueError(f"object line {line!r} is not '<n>: <size> <colour> <shape>[ at (<x>, <y>)]'")
    size, color, shape = m.group(2), m.group(3), m.group(4)
    if size not in SIZES or color not in COLORS or shape not in SHAPES:
        raise ValueError(f"object line {line!r}: unknown size, colour or shape")
    x, y = (None, None) if m.group(5) is None else (int(m.group(5)) / 100, int(m.group(6)) / 100)
    return int(m.group(1)), DescribedObject(size, color, shape, x, y)


def _parse_relations(value: str, num_objects: int) -> tuple[tuple[int, str, int], ...]:
    if value == "none":
        return ()
    out = []
    for part in value.split("; "):
        m = _RELATION.fullmatch(part)
        if m is None:
            raise ValueError(f"relation {part!r} is not '<i> <predicate> <j>'")
        i, j = int(m.group(1)) - 1, int(m.group(3)) - 1
        if not (0 <= i < num_objects and 0 <= j < num_objects) or i == j:
            raise ValueError(f"relation {part!r} names an object outside 1..{num_objects}")
        out.append((i, m.group(2), j))
    return tuple(out)


def _parse_defects(value: str) -> tuple[tuple[str, str], ...]:
    if value == "none":
        return ()
    out = []
    for part in value.split("; "):
        name, _, level = part.partition(" ")
        if name not in DEFECT_DIMENSION or level not in LEVELS:
            raise ValueError(f"defect {part!r} is not '<name> mild|severe' with a name in {tuple(DEFECT_DIMENSION)}")
        out.append((name, level))
    return tuple(out)


def parse_description(text: str, strict: bool = True) -> Description:
    """Inverse of `format_description` (either style).

    strict=True: every line must parse, in the canonical order, all object lines in one style, and the
    `objects:` counts must agree with the object lines; otherwise ValueError naming the line.
    strict=False: lines that do not parse are skipped (their field stays None / the object is left out), for
    scoring generated text per attribute.
    """
    fields: dict[str, object] = {}
    objects: list[DescribedObject] = []
    lines = text.strip("\n").split("\n")
    for number, line in enumerate(lines, start=1):
        try:
            if line[:1].isdigit():
                k, obj = _parse_object(line)
                if strict and k != len(objects) + 1:
                    raise ValueError(f"object line {line!r} is numbered {k}, expected {len(objects) + 1}")
                objects.append(obj)
                continue
            key, sep, value = line.partition(": ")
            if not sep or key not in KEYS:
                raise ValueError(f"line {line!r} has no known key (expected one of {KEYS} or '<n>:')")
            if key == "background":
                if value not in BACKGROUNDS:
                    raise ValueError(f"background {value!r}: expected one of {tuple(BACKGROUNDS)}")
                fields[key] = value
            elif key == "objects":
                fields[key] = canonical_groups(parse_content(value))
            elif key == "relations":
                fields[key] = _parse_relations(value, len(objects))
            else:
                fields[key] = _parse_defects(value)
        except ValueError as err:
            if strict:
                raise ValueError(f"description line {number}: {err}") from err
    desc = Description(background=fields.get("background"), groups=fields.get("objects"),
                       objects=tuple(objects), relations=fields.get("relations"),
                       defects=fields.get("defects"))  # type: ignore[arg-type]
    if strict:
        missing = [key for key in KEYS if key not in fields]
        if missing:
            raise ValueError(f"description lacks the line(s) {missing}")
        drawn: dict[Combo, int] = {}
        for o in objects:
            drawn[(o.color, o.shape)] = drawn.get((o.color, o.shape), 0) + 1
        if canonical_groups(drawn) != desc.groups:
            raise ValueError(f"description's objects line {content_phrase(desc.groups)!r} disagrees with its "
                             f"object lines ({content_phrase(canonical_groups(drawn))!r})")
        positioned = {o.x is not None for o in objects}
        if len(positioned) > 1:
            raise ValueError("description mixes object lines with and without positions (mixed styles)")
        style = "canonical" if positioned != {False} else "compact"
        if format_description(desc, style) != text.strip("\n"):
            raise ValueError("description is not in canonical form (line order, object counts or spacing)")
    return desc
