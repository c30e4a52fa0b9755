"""Prompts of the Shapes world: the words for an intended scene, and back.

Grammar (canonical; `prompt_for` writes it, `parse_prompt` reads exactly it):

    prompt   := content " on a " BACKGROUND " background"
    content  := group | group " and " group | group ", " group " and " group
              | single " " PREDICATE " " single                  (relation prompts: exactly two objects)
    group    := ("a" | "an" | "two" | "three") " " COLOUR " " SHAPE["s"]
    single   := ("a" | "an") " " COLOUR " " SHAPE

Groups are ordered by (palette order of COLORS, order of SHAPES). A relation prompt has exactly two
objects of different (colour, shape), so subject and reference are identifiable from colour and shape
alone; e.g. "a red circle left of a blue square on a black background".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zray.data.scene import BACKGROUNDS, COLORS, NUMBER_WORDS, RELATIONS, SHAPES, Scene

Combo = tuple[str, str]  # (colour, shape)

_WORD_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()} | {"a": 1, "an": 1}


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: background, (count, colour, shape) groups, optional relation."""

    background: str
    groups: tuple[tuple[int, str, str], ...]  # canonical order, counts >= 1, combos distinct
    relation: tuple[Combo, str, Combo] | None = None  # (subject combo, predicate, reference combo)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"PromptSpec.background={self.background!r}: expected one of {tuple(BACKGROUNDS)}")
        combos = [(c, s) for _, c, s in self.groups]
        if len(set(combos)) != len(combos):
            raise ValueError(f"PromptSpec.groups repeat a (colour, shape): {self.groups}")
        if not 1 <= sum(n for n, _, _ in self.groups) <= 3:
            raise ValueError(f"PromptSpec.groups describe {sum(n for n, _, _ in self.groups)} objects: expected 1 to 3")
        if self.relation is not None:
            subject, predicate, reference = self.relation
            if predicate not in RELATIONS or subject == reference or self.counts() != {subject: 1, reference: 1}:
                raise ValueError(f"PromptSpec.relation={self.relation!r} must relate the only two objects, "
                                 f"of different (colour, shape), with one of {RELATIONS}")

    def counts(self) -> dict[Combo, int]:
        return {(c, s): n for n, c, s in self.groups}

    def combos(self) -> frozenset[Combo]:
        return frozenset(self.counts())

    @property
    def num_objects(self) -> int:
        return sum(n for n, _, _ in self.groups)


def canonical_groups(counts: dict[Combo, int]) -> tuple[tuple[int, str, str], ...]:
    colours, shapes = list(COLORS), list(SHAPES)
    order = sorted(counts, key=lambda cs: (colours.index(cs[0]), shapes.index(cs[1])))
    return tuple((counts[cs], cs[0], cs[1]) for cs in order)


def spec_of(scene: Scene) -> PromptSpec:
    """The prompt content of a scene (its relation, if any, by the related objects' colour and shape)."""
    relation = None
    if scene.relation is not None:
        a, b = scene.objects[scene.relation.subject], scene.objects[scene.relation.reference]
        relation = ((a.color, a.shape), scene.relation.predicate, (b.color, b.shape))
    return PromptSpec(background=scene.background, groups=canonical_groups(scene.counts()), relation=relation)


def group_phrase(count: int, colour: str, shape: str) -> str:
    if count == 1:
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape}"
    return f"{NUMBER_WORDS[count]} {colour} {shape}s"


def content_phrase(groups: tuple[tuple[int, str, str], ...]) -> str:
    """'two red circles and a blue square' (also the 'objects:' line of a caption)."""
    phrases = [group_phrase(*g) for g in groups]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def prompt_text(spec: PromptSpec) -> str:
    if spec.relation is not None:
        (sc, ss), predicate, (rc, rs) = spec.relation
        content = f"{group_phrase(1, sc, ss)} {predicate} {group_phrase(1, rc, rs)}"
    else:
        content = content_phrase(spec.groups)
    return f"{content} on a {spec.background} background"


def prompt_for(scene: Scene) -> str:
    """The canonical prompt of a scene; raises ValueError for a relation scene that is not two distinct
    (colour, shape) objects (such a relation could not be stated unambiguously)."""
    return prompt_text(spec_of(scene))


_GROUP = re.compile(r"(a|an|one|two|three) ([a-z]+) ([a-z]+?)(s?)")


def parse_group(text: str) -> tuple[int, str, str]:
    """'two red circles' -> (2, 'red', 'circle'); raises ValueError naming the phrase."""
    m = _GROUP.fullmatch(text)
    if m is None:
        raise ValueError(f"group {text!r} is not '<number> <colour> <shape>'")
    count, colour, shape, plural = _WORD_NUMBERS[m.group(1)], m.group(2), m.group(3), m.group(4)
    if colour not in COLORS or shape not in SHAPES:
        raise ValueError(f"group {text!r}: unknown colour or shape (colours {tuple(COLORS)}, shapes {SHAPES})")
    if (count > 1) != bool(plural):
        raise ValueError(f"group {text!r}: number and plural do not agree")
    return count, colour, shape


def parse_content(text: str) -> dict[Combo, int]:
    """'two red circles and a blue square' -> {('red', 'circle'): 2, ('blue', 'square'): 1}."""
    parts = text.split(" and ")
    if len(parts) != 2 and len(parts) != 1:
        raise ValueError(f"content {text!r}: expected groups joined by ', ' and one final ' and '")
    pieces = parts[0].split(", ") + parts[1:]
    counts: dict[Combo, int] = {}
    for piece in pieces:
        n, colour, shape = parse_group(piece)
        if (colour, shape) in counts:
            raise ValueError(f"content {text!r} names {colour} {shape} twice")
        counts[(colour, shape)] = n
    return counts


def parse_prompt(text: str) -> PromptSpec:
    """Inverse of `prompt_text`; raises ValueError naming what does not parse."""
    m = re.fullmatch(r"(.+) on a ([a-z]+) background", text)
    if m is None:
        raise ValueError(f"prompt {text!r} does not end with 'on a <background> background'")
    content, background = m.group(1), m.group(2)
    for predicate in RELATIONS:
        sides = content.split(f" {predicate} ")
        if len(sides) == 2:
            (n1, c1, s1), (n2, c2, s2) = parse_group(sides[0]), parse_group(sides[1])
            if n1 != 1 or n2 != 1:
                raise ValueError(f"prompt {text!r}: a relation relates single objects")
            return PromptSpec(background=background, groups=canonical_groups({(c1, s1): 1, (c2, s2): 1}),
                              relation=((c1, s1), predicate, (c2, s2)))
    spec = PromptSpec(background=background, groups=canonical_groups(parse_content(content)))
    if prompt_text(spec) != text:
        raise ValueError(f"prompt {text!r} is not in canonical form (expected {prompt_text(spec)!r})")
    return spec
