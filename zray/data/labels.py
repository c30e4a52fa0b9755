"""Ground truth and simulated human labels of the Shapes world.

**True score** of a candidate (prompt spec P, drawn scene S, realised defects D) per dimension, in [1, 5]:

    alignment    = clip(5 - alignment_penalty(P, S), 1, 5)
    realism      = clip(5 - 3 (noise + banding + blotches), 1, 5)
    aesthetics   = clip(5 - 3 (blur + off_centre + cramped + clashing), 1, 5)
    plausibility = clip(5 - 3 (cut_by_frame + interpenetrating + floating_shadow), 1, 5)

with each defect's severity in [0, 1] (`DEFECT_WEIGHT` = 3 for all) and

    alignment_penalty = 1.0 [background differs]
                      + content cost: the cheapest one-to-one matching of the prompt's objects with the
                        drawn objects, 1.5 per differing colour, 1.5 per differing shape, 1.5 per object
                        left unmatched (missing or extra)
                      + 2.0 [the prompt has a relation, the drawn scene has exactly one object of the
                             subject's (colour, shape) and one of the reference's, and the relation
                             between their centres does not hold]

(a relation whose objects cannot be identified is already paid for by the content cost). An image with no
object at all (possible only for generated images, judged by `judge.py`) gets the full penalty 4, i.e.
alignment 1: it shows none of the requested content, whatever the background. So 5 means
flawless; one wrong colour gives 3.5, a wrong background 4.0, a violated relation 3.0, a mild degradation
(severity 0.15 to 0.4) 4.55 to 3.8.

**Bins**: the rubric's nine half-point bins 1.0, 1.5, ..., 5.0 (`zray.rubric.SCORE_BINS`). `snap(s)` clips a
noisy rating to [1, 5] first (the one place a score is clipped, on purpose), then takes its bin with
`zray.rubric.label_index` (`round((s - 1) / 0.5)`, Python's round: halves to even).

**Training label** (one calibrated rating): `snap(true + N(0, train_label_noise))`.

**Test label**: K annotators, annotator a with a bias b[a, d] ~ N(0, annotator_bias) fixed for the split,
each rates `snap(true + b[a, d] + N(0, annotator_noise))` (a half-point rating, like a human); drop one
highest and one lowest rating, average the rest (the "human score"), snap the average to a bin (the label).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zray.data.prompt_grammar import PromptSpec
from zray.data.scene import DEFECT_DIMENSION, Defects, Relation, Scene
from zray.rubric import DIMENSIONS, SCORE_BINS, SCORE_MAX, SCORE_MIN, label_index

DEFECT_WEIGHT: dict[str, float] = {name: 3.0 for name in DEFECT_DIMENSION}
PENALTY_BACKGROUND = 1.0
PENALTY_ATTRIBUTE = 1.5  # per wrong colour, per wrong shape, per missing or extra object
PENALTY_RELATION = 2.0
PENALTY_EMPTY = 4.0  # no object drawn at all: alignment 1


def snap(score: float) -> float:
    """The bin value nearest to `score`, after clipping it to [1, 5] (noisy ratings can fall outside)."""
    return SCORE_BINS[label_index(min(max(float(score), SCORE_MIN), SCORE_MAX))]


def content_cost(wanted: Sequence[tuple[str, str]], drawn: Sequence[tuple[str, str]]) -> float:
    """Cheapest matching of (colour, shape) lists; see the module docstring."""
    size = max(len(wanted), len(drawn))
    a = list(wanted) + [None] * (size - len(wanted))
    b = list(drawn) + [None] * (size - len(drawn))

    def cost(x, y) -> float:
        if x is None and y is None:
            return 0.0
        if x is None or y is None:
            return PENALTY_ATTRIBUTE
        return PENALTY_ATTRIBUTE * ((x[0] != y[0]) + (x[1] != y[1]))

    return min(sum(cost(x, b[k]) for x, k in zip(a, perm)) for perm in itertools.permutations(range(size)))


def alignment_penalty(spec: PromptSpec, scene: Scene) -> float:
    drawn = [(o.color, o.shape) for o in scene.objects]
    if not drawn:
        return PENALTY_EMPTY
    penalty = PENALTY_BACKGROUND if scene.background != spec.background else 0.0
    wanted = [(c, s) for n, c, s in spec.groups for _ in range(n)]
    penalty += content_cost(wanted, drawn)
    if spec.relation is not None:
        subject, predicate, reference = spec.relation
        subj = [o for o in scene.objects if (o.color, o.shape) == subject]
        ref = [o for o in scene.objects if (o.color, o.shape) == reference]
        if len(subj) == 1 and len(ref) == 1 and not Relation(0, predicate, 1).holds((subj[0], ref[0])):
            penalty += PENALTY_RELATION
    return penalty


def true_scores(spec: PromptSpec, scene: Scene, defects: Defects) -> dict[str, float]:
    """Per-dimension true score in [1, 5] (formula in the module docstring), rounded to 4 decimals."""
    penalties = {d: 0.0 for d in DIMENSIONS}
    penalties["alignment"] = alignment_penalty(spec, scene)
    for name, severity in defects.to_dict().items():
        penalties[DEFECT_DIMENSION[name]] += DEFECT_WEIGHT[name] * severity
    return {d: round(min(5.0, max(1.0, 5.0 - penalties[d])), 4) for d in DIMENSIONS}


def train_labels(true: dict[str, float], rng: np.random.Generator, noise: float) -> dict[str, float]:
    """One calibrated rating per dimension: the true score plus N(0, noise), snapped."""
    return {d: snap(true[d] + float(rng.normal(0.0, noise))) for d in DIMENSIONS}


def annotator_biases(rng: np.random.Generator, num_annotators: int, bias: float) -> np.ndarray:
    """[num_annotators, len(DIMENSIONS)] biases, fixed for a split."""
    return rng.normal(0.0, bias, size=(num_annotators, len(DIMENSIONS)))


def annotate(
    true: dict[str, float], biases: np.ndarray, rng: np.random.Generator, noise: float,
) -> dict[str, list[float]]:
    """Each annotator's half-point rating per dimension (biases: [K, len(DIMENSIONS)])."""
    draws = rng.normal(0.0, noise, size=biases.shape)
    return {d: [snap(true[d] + float(biases[a, j] + draws[a, j])) for a in range(biases.shape[0])]
            for j, d in enumerate(DIMENSIONS)}


def drop_extremes_mean(ratings: Sequence[float]) -> float:
    """Mean after dropping one highest and one lowest rating (needs at least 3 ratings)."""
    if len(ratings) < 3:
        raise ValueError(f"drop_extremes_mean needs at least 3 ratings, got {len(ratings)}")
    kept = sorted(ratings)[1:-1]
    return sum(kept) / len(kept)


@dataclass(frozen=True)
class Pair:
    """Two candidates of one prompt whose labels differ in `dimension`; winner has the higher label."""

    prompt_id: str
    dimension: str
    winner_id: str
    loser_id: str
    winner_label: float
    loser_label: float

    @property
    def gap(self) -> float:
        return self.winner_label - self.loser_label


def make_pairs(prompt_id: str, candidate_ids: Sequence[str], labels: Sequence[dict[str, float]],
               dimensions: Sequence[str] = DIMENSIONS) -> list[Pair]:
    """Every same-prompt candidate pair with different labels, per dimension (dimension-major order, then
    (i, j) with i < j in candidate order); the winner has the higher label, ties are dropped."""
    out = []
    for d in dimensions:
        for i, j in itertools.combinations(range(len(candidate_ids)), 2):
            li, lj = labels[i][d], labels[j][d]
            if li == lj:
                continue
            w, l = (i, j) if li > lj else (j, i)
            out.append(Pair(prompt_id, d, candidate_ids[w], candidate_ids[l], labels[w][d], labels[l][d]))
    return out
