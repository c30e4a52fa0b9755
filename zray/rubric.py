"""The rubric: its dimensions, its nine-bin score scale and score tokens, anchor text, and the scoring prompts
(Qwen chat messages, methods.md §1).

One place builds every scoring context, so the teacher's rollouts (vLLM), its training (transformers), the
student and the reward service all see the same text:

    teacher:  [system rubric] [user: image, prompt, dimension]  assistant: <reasoning> Score: <s_x>
    student:  [system rubric] [user: image, prompt, dimension]  assistant: <s_x>

The score position is the position that predicts `<s_x>`: for the teacher it follows the fixed score prefix
after the reasoning; for the student it is the first answer position.

Rubric files (`load_rubric`): other dimensions and anchors than the four built-in ones, for imported data
(docs/data-formats.md); YAML files need PyYAML (imported lazily).

Pure: standard library only. Functions that render text take any object with a Hugging Face style
`apply_chat_template` (a tokenizer or a processor).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

DIMENSIONS: tuple[str, ...] = ("alignment", "realism", "aesthetics", "plausibility")
DIMENSION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # safe in column names (label_<d>) and file names

# The score scale: nine half-point bins S = {1.0, 1.5, ..., 5.0}, each spelled by one dedicated token.
SCORE_MIN = 1.0
SCORE_MAX = 5.0
SCORE_STEP = 0.5
SCORE_RANGE = SCORE_MAX - SCORE_MIN  # R in the paper
NUM_BINS = 9
SCORE_BINS: tuple[float, ...] = tuple(SCORE_MIN + SCORE_STEP * k for k in range(NUM_BINS))
SCORE_TOKENS: tuple[str, ...] = tuple(f"<s_{s:.1f}>" for s in SCORE_BINS)


def label_index(score: float) -> int:
    """Index k of the bin of `score`: round((s - 1.0) / 0.5) (Python's round, halves to even), for s in [1, 5];
    a score outside [1, 5] or not finite raises ValueError."""
    s = float(score)
    if not math.isfinite(s) or not SCORE_MIN <= s <= SCORE_MAX:
        raise ValueError(f"score={score!r} is not allowed: expected a number in [{SCORE_MIN}, {SCORE_MAX}]")
    return int(round((s - SCORE_MIN) / SCORE_STEP))


def score_token(score: float) -> str:
    """The score token of the bin that `score` falls in, e.g. 3.5 -> '<s_3.5>'."""
    return SCORE_TOKENS[label_index(score)]

# Five-level anchors, short on purpose (the tiny models have a small context).
RUBRICS: dict[str, tuple[str, str, str, str, str]] = {
    "alignment": (
        "the image does not match the prompt",
        "most objects are wrong",
        "some objects, colors or counts are wrong",
        "one small error",
        "the image matches the prompt exactly",
    ),
    "realism": (
        "heavy noise and blotches",
        "strong artifacts",
        "some artifacts",
        "slight artifacts",
        "clean and sharp",
    ),
    "aesthetics": (
        "ugly and cluttered",
        "poor layout",
        "plain",
        "good layout",
        "balanced and pleasing",
    ),
    "plausibility": (
        "shapes are broken or impossible",
        "major distortions",
        "some distortions",
        "minor distortions",
        "all shapes are whole and plausible",
    ),
}

SCORE_PREFIX = "Score: "  # fixed text between the teacher's reasoning and the score token
SYSTEM_TEXT = "You rate images. Answer with a score from 1 to 5."


@dataclass(frozen=True)
class ScoreRequest:
    """One scoring query: a text-to-image prompt, the image (PIL, RGB), a rubric dimension, and for the
    teacher form the reasoning to teacher-force before the score prefix (None: the student form).

    `anchors`: the dimension's five anchor texts when it comes from another rubric than the built-in one (an
    import's, `Rubric.anchors_for`); None = a built-in dimension with its built-in anchors."""

    prompt: str
    image: Any
    dimension: str
    reasoning: str | None = None
    anchors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_dimension(self.dimension, self.anchors)
        check_prompt(self.prompt)


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r} is not allowed: expected a non-empty string")
    return prompt


def check_dimension(dimension: str, anchors: tuple[str, ...] | None = None) -> str:
    """A built-in dimension (anchors None), or any well-formed dimension name with its five anchors given."""
    if anchors is None:
        if dimension not in DIMENSIONS:
            raise ValueError(f"dimension={dimension!r} is not allowed: expected one of {DIMENSIONS} (or pass the "
                             "anchors of another rubric's dimension)")
        return dimension
    check_named_anchors(dimension, anchors)
    return dimension


def check_named_anchors(dimension: Any, anchors: Any, where: str = "") -> None:
    """A well-formed dimension name (safe in column and file names) with a tuple of five non-empty anchors; the
    ValueError starts with `where` when given (e.g. the rubric file)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(dimension, str) or not DIMENSION_NAME.match(dimension):
        raise ValueError(f"{prefix}dimension name {dimension!r} is not allowed: expected lower-case letters, digits "
                         "and '_', starting with a letter, at most 32 characters")
    if (not isinstance(anchors, tuple) or len(anchors) != 5
            or not all(isinstance(t, str) and t.strip() for t in anchors)):
        raise ValueError(f"{prefix}dimension {dimension!r} anchors={anchors!r} are not allowed: expected five "
                         "non-empty strings (levels 1 to 5)")


def check_dimensions(dimensions: Any) -> tuple[str, ...]:
    """`dimensions` as a tuple, checked: a non-empty subset of DIMENSIONS without repeats (ValueError otherwise)."""
    dims = tuple(dimensions)
    if not dims or len(set(dims)) != len(dims):
        raise ValueError(f"dimensions={dims!r} is not allowed: expected distinct rubric dimensions (a non-empty "
                         f"subset of {DIMENSIONS} without repeats)")
    for dim in dims:
        check_dimension(dim)
    return dims


def rubric_text(dimension: str, anchors: tuple[str, ...] | None = None) -> str:
    """The rubric of `dimension`, one anchor a line (its built-in anchors unless `anchors` is given)."""
    anchors = RUBRICS[check_dimension(dimension)] if anchors is None else anchors
    check_dimension(dimension, anchors)
    lines = [f"Rubric for {dimension}:"] + [f"{level}: {text}" for level, text in enumerate(anchors, start=1)]
    return "\n".join(lines)


def instruction_text(prompt: str, dimension: str, reasoning: bool, anchors: tuple[str, ...] | None = None) -> str:
    """The user turn's text after the image."""
    check_dimension(dimension, anchors)
    ask = "Explain briefly, then give the score." if reasoning else "Give the score."
    return f"Prompt: {prompt}\nDimension: {dimension}\n{ask}"


def build_messages(prompt: str, dimension: str, reasoning: bool, anchors: tuple[str, ...] | None = None
                   ) -> list[dict[str, Any]]:
    """Qwen chat messages: system rubric, then the user turn with one image and the text.

    The image is a placeholder `{"type": "image"}`; the pixels go to the processor (transformers) or to
    `multi_modal_data` (vLLM) alongside the rendered text. `anchors`: those of another rubric's dimension.
    """
    check_prompt(prompt)
    system = f"{SYSTEM_TEXT}\n{rubric_text(dimension, anchors)}"
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [
            {"type": "image"},
            {"type": "text", "text": instruction_text(prompt, dimension, reasoning, anchors)},
        ]},
    ]


def answer_prefix(reasoning: str | None) -> str:
    """Assistant text before the score token: `<reasoning> Score: ` for the teacher, '' for the student."""
    if reasoning is None:
        return ""
    return f"{reasoning.strip()} {SCORE_PREFIX}" if reasoning.strip() else SCORE_PREFIX


def answer_text(score_token: str, reasoning: str | None) -> str:
    """A full assistant answer, e.g. for SFT targets: `answer_prefix(reasoning) + score_token`."""
    return answer_prefix(reasoning) + score_token


def render_generation_prompt(chat: Any, prompt: str, dimension: str, reasoning: bool,
                             anchors: tuple[str, ...] | None = None) -> str:
    """The rendered chat up to the start of the assistant answer (where the teacher starts reasoning)."""
    messages = build_messages(prompt, dimension, reasoning, anchors)
    return chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_score_context(chat: Any, prompt: str, dimension: str, reasoning: str | None = None,
                         anchors: tuple[str, ...] | None = None) -> str:
    """The rendered text that ends right before the score token (teacher forcing of `reasoning`).

    `reasoning=None` is the student form (the score is the first answer token); a string is the teacher
    form (the reasoning, then the fixed score prefix).
    """
    head = render_generation_prompt(chat, prompt, dimension, reasoning is not None, anchors)
    return head + answer_prefix(reasoning)


# ---- rubric files: dimensions and anchors from a config file (zray data import --rubric) ---------------------


@dataclass(frozen=True)
class Rubric:
    """Rubric dimensions in order, each with its five anchor texts (levels 1..5); `source` says where it came
    from ('builtin' or the file). Validated on construction (ValueError naming the dimension and the problem)."""

    dimensions: tuple[str, ...]
    anchors: tuple[tuple[str, str, str, str, str], ...]
    source: str = "builtin"

    def __post_init__(self) -> None:
        where = f"rubric {self.source!r}"
        if not self.dimensions or len(self.dimensions) != len(self.anchors):
            raise ValueError(f"{where}: {len(self.dimensions)} dimensions and {len(self.anchors)} anchor lists are "
                             "not allowed: expected one or more dimensions, each with five anchors")
        for name, texts in zip(self.dimensions, self.anchors):
            check_named_anchors(name, texts, where)
        repeats = sorted({d for d in self.dimensions if self.dimensions.count(d) > 1})
        if repeats:
            raise ValueError(f"{where}: dimensions {repeats} repeat: expected distinct names")

    def anchors_of(self, dimension: str) -> tuple[str, str, str, str, str]:
        if dimension not in self.dimensions:
            raise ValueError(f"dimension={dimension!r} is not allowed: expected one of {self.dimensions}")
        return self.anchors[self.dimensions.index(dimension)]

    def anchors_for(self, dimension: str) -> tuple[str, ...] | None:
        """What a `ScoreRequest` of `dimension` carries: None for a built-in dimension with its built-in anchors
        (the built-in prompt), else this rubric's anchors."""
        anchors = self.anchors_of(dimension)
        return None if RUBRICS.get(dimension) == anchors else anchors

    def to_dict(self) -> dict[str, list[str]]:
        """{dimension: [five anchors]} in order: the rubric file format (and the import manifest's)."""
        return {d: list(a) for d, a in zip(self.dimensions, self.anchors)}


BUILTIN_RUBRIC = Rubric(DIMENSIONS, tuple(RUBRICS[d] for d in DIMENSIONS))


def parse_rubric(data: Any, source: str) -> Rubric:
    """A rubric from parsed file content: `{"dimensions": {name: [five anchor texts], ...}}` (order kept)."""
    if not isinstance(data, dict) or set(data) != {"dimensions"} or not isinstance(data["dimensions"], dict):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"rubric {source!r}: top level {keys} is not allowed: expected one key 'dimensions' "
                         "mapping each dimension name to its five anchor texts")
    dims = data["dimensions"]
    for name, texts in dims.items():
        if not isinstance(texts, list):
            raise ValueError(f"rubric {source!r}: dimension {name!r} anchors={texts!r} are not allowed: expected a "
                             "list of five non-empty strings (levels 1 to 5)")
    return Rubric(tuple(dims), tuple(tuple(t) for t in dims.values()), source=source)


def load_rubric(path: str | os.PathLike | None) -> Rubric:
    """The rubric of a JSON or YAML file (`.json`, `.yaml`, `.yml`; format in `parse_rubric`), or the four
    built-in dimensions for None. Raises ValueError naming the file and the problem."""
    if path is None:
        return BUILTIN_RUBRIC
    source = os.fspath(path)
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"rubric file {source!r} is not allowed: expected a .json, .yaml or .yml file")
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"rubric file {source!r} does not read: {err}") from err
    kind = "JSON" if suffix == ".json" else "YAML"
    try:
        if kind == "JSON":
            data = json.loads(text)
        else:
            import yaml  # lazy: only YAML rubric files need PyYAML

            data = yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"rubric file {source!r} does not parse as {kind}: {err}") from err
    return parse_rubric(data, source)
