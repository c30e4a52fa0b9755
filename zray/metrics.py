"""Evaluation metrics (../shared/spec/methods.md section 4 and shapes-world.md's fidelity table).

Pure: numpy and scipy only (no torch, ray or transformers), so any layer may import it.

Legend: `pred_*` are predicted expected scores `mu`, `human_*` are (aggregated) human scores `s`; the
`_a` / `_b` suffix names the two candidates of a same-prompt pair; `feats_ND` is N feature vectors of size D.

Conventions:
- Every function accepts array-likes (lists, tuples, numpy arrays) and validates them: wrong shapes,
  mismatched lengths or non-finite values raise `ValueError` naming the argument.
- "Undefined" results return `nan` rather than raising, so that a report table can still be printed:
  HPA / Margin HPA with no qualifying pair, PLCC / SRCC with fewer than two points or a constant input,
  GSB with no judgments. Callers that need a number must check with `math.isnan`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import linalg, stats

# Score differences are multiples of 0.5 on the label bins; this absorbs float round-off when deciding
# whether two human scores tie or whether a difference exceeds the margin.
_SCORE_ATOL = 1e-9
MARGIN = 0.5


def _vector(name: str, values) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array-like of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D: got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}[{bad}]={arr[bad]!r} is not allowed: expected finite numbers")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length: got {lengths}")


def _pair_diffs(pred_a, pred_b, human_a, human_b) -> tuple[np.ndarray, np.ndarray]:
    arrays = {
        "pred_a": _vector("pred_a", pred_a),
        "pred_b": _vector("pred_b", pred_b),
        "human_a": _vector("human_a", human_a),
        "human_b": _vector("human_b", human_b),
    }
    _same_length(**arrays)
    return arrays["pred_a"] - arrays["pred_b"], arrays["human_a"] - arrays["human_b"]


def _pair_accuracy(pred_diff: np.ndarray, human_diff: np.ndarray, min_gap: float) -> tuple[float, int]:
    """Accuracy over pairs with |human_diff| > min_gap (plus round-off tolerance) and its pair count."""
    keep = np.abs(human_diff) > min_gap + _SCORE_ATOL
    num = int(keep.sum())
    if num == 0:
        return math.nan, 0
    # A predicted tie (pred_diff == 0) gives a product of 0, which is not > 0: counted wrong.
    correct = (pred_diff[keep] * human_diff[keep]) > 0
    return float(correct.mean()), num


def hpa(pred_a, pred_b, human_a, human_b) -> float:
    """Human preference accuracy over same-prompt pairs.

    Pairs whose human scores tie are excluded; a pair is correct iff `(mu_a - mu_b)(s_a - s_b) > 0`, so a
    predicted tie counts as wrong. Returns `nan` when no pair has different human scores.
    """
    pred_diff, human_diff = _pair_diffs(pred_a, pred_b, human_a, human_b)
    return _pair_accuracy(pred_diff, human_diff, 0.0)[0]


def margin_hpa(pred_a, pred_b, human_a, human_b, margin: float = MARGIN) -> float:
    """HPA restricted to pairs with `|s_a - s_b| > margin` (default 0.5, the spec's Margin HPA).

    Returns `nan` when no pair's human scores differ by more than `margin`.
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin={margin!r} is not allowed: expected a finite number >= 0")
    pred_diff, human_diff = _pair_diffs(pred_a, pred_b, human_a, human_b)
    return _pair_accuracy(pred_diff, human_diff, float(margin))[0]


def hpa_table(
    dimensions: Sequence[str], pred_a, pred_b, human_a, human_b, margin: float = MARGIN
) -> dict[str, dict[str, float]]:
    """HPA and Margin HPA per rubric dimension and pooled over all pairs, from flat per-pair records.

    `dimensions[i]` names the dimension of pair i. Returns `{dim: {...}, ..., "pooled": {...}}` where each
    entry holds `hpa`, `margin_hpa` (nan where no pair qualifies), `num_pairs` (pairs without a human tie)
    and `num_margin_pairs`. Dimensions appear in first-seen order; "pooled" is always last.
    """
    dims = list(dimensions)
    for i, d in enumerate(dims):
        if not isinstance(d, str):
            raise ValueError(f"dimensions[{i}]={d!r} is not allowed: expected a string")
    pred_diff, human_diff = _pair_diffs(pred_a, pred_b, human_a, human_b)
    if len(dims) != len(pred_diff):
        raise ValueError(f"dimensions has {len(dims)} entries but there are {len(pred_diff)} pairs")
    dims_arr = np.asarray(dims, dtype=object)

    def row(mask: np.ndarray) -> dict[str, float]:
        acc, num = _pair_accuracy(pred_diff[mask], human_diff[mask], 0.0)
        macc, mnum = _pair_accuracy(pred_diff[mask], human_diff[mask], float(margin))
        return {"hpa": acc, "margin_hpa": macc, "num_pairs": num, "num_margin_pairs": mnum}

    out = {d: row(dims_arr == d) for d in dict.fromkeys(dims)}
    out["pooled"] = row(np.ones(len(dims), dtype=bool))
    return out


def _correlation_inputs(pred, human) -> tuple[np.ndarray, np.ndarray] | None:
    p, h = _vector("pred", pred), _vector("human", human)
    _same_length(pred=p, human=h)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(h) == 0:
        return None
    return p, h


def plcc(pred, human) -> float:
    """Pearson linear correlation of predicted `mu` with human scores; nan if < 2 points or constant input."""
    inputs = _correlation_inputs(pred, human)
    if inputs is None:
        return math.nan
    return float(stats.pearsonr(*inputs).statistic)


def srcc(pred, human) -> float:
    """Spearman rank correlation of predicted `mu` with human scores; nan if < 2 points or constant input."""
    inputs = _correlation_inputs(pred, human)
    if inputs is None:
        return math.nan
    return float(stats.spearmanr(*inputs).statistic)


def paired_bootstrap(correct_a, correct_b, clusters, *, num_samples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Paired cluster bootstrap of the accuracy difference of two methods judged on the same items (e.g. HPA: one
    item per test pair, 1 where the method orders the pair as the humans do).

    `correct_a[i]`, `correct_b[i]` in {0, 1} (or any floats) for item i; `clusters[i]` its resampling unit (the
    prompt: pairs of one prompt share candidates, so they are resampled together). Each bootstrap sample draws as
    many clusters as there are, with replacement, and takes mean(a) - mean(b) over their items. Returns {"diff"
    (on the data), "lo", "hi" (the percentile interval at `level`), "num_items", "num_clusters"}.
    """
    a, b = _vector("correct_a", correct_a), _vector("correct_b", correct_b)
    _same_length(correct_a=a, correct_b=b)
    keys = list(clusters)
    if len(keys) != len(a):
        raise ValueError(f"clusters has {len(keys)} entries but there are {len(a)} items")
    if not len(a):
        raise ValueError("no items to bootstrap")
    if not 0.0 < level < 1.0 or num_samples < 1:
        raise ValueError(f"level={level}, num_samples={num_samples}: expected 0 < level < 1, num_samples >= 1")
    ids = {k: j for j, k in enumerate(dict.fromkeys(keys))}
    cluster_of = np.array([ids[k] for k in keys])
    num = len(ids)
    sum_a, sum_b = np.bincount(cluster_of, a, num), np.bincount(cluster_of, b, num)
    size = np.bincount(cluster_of, minlength=num).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(num, size=(num_samples, num))
    counts = np.zeros((num_samples, num))
    np.add.at(counts, (np.arange(num_samples)[:, None], draws), 1.0)  # how often each cluster was drawn
    items = counts @ size
    diffs = (counts @ sum_a - counts @ sum_b) / items
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail])
    return {"diff": float(a.mean() - b.mean()), "lo": float(lo), "hi": float(hi), "num_items": int(len(a)),
            "num_clusters": int(num)}


_GSB_VALUES = {"G": 1, "S": 0, "B": -1, 1: 1, 0: 0, -1: -1}


def gsb_net(judgments: Iterable) -> float:
    """Net GSB `(G - B) / (G + S + B)` of optimised vs baseline images.

    Each judgment is 'G' / 'S' / 'B' (Good / Same / Bad for the optimised image) or +1 / 0 / -1.
    Any other value (including booleans and lowercase letters) raises ValueError. No judgments -> nan.
    """
    if isinstance(judgments, np.ndarray):
        judgments = judgments.tolist()
    total = net = 0
    for i, value in enumerate(judgments):
        if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
            ok = False
        else:
            try:
                ok = value in _GSB_VALUES
            except TypeError:  # unhashable
                ok = False
        if not ok:
            raise ValueError(
                f"judgments[{i}]={value!r} is not allowed: expected 'G', 'S', 'B' or +1, 0, -1"
            )
        net += _GSB_VALUES[value]
        total += 1
    return math.nan if total == 0 else net / total


def _features(name: str, feats) -> np.ndarray:
    try:
        arr = np.asarray(feats, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an (N, D) array-like of numbers: {exc}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N samples x D features): got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} has shape {arr.shape}: expected at least 2 samples and 1 feature")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values: expected finite numbers")
    return arr


def _sqrtm_relative_error(root: np.ndarray, mat: np.ndarray) -> float:
    scale = max(float(np.linalg.norm(mat)), 1e-300)
    return float(np.linalg.norm(root @ root - mat) / scale)


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N x D and M x D, same D).

    `||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 sqrtm(C_a C_b))` with unbiased covariances (as in FID). If the
    matrix square root is not finite, inaccurate, or has a non-negligible imaginary part (near-singular
    covariances, e.g. N <= D), it is recomputed with `eps * I` added to both covariances; tiny imaginary
    parts from round-off are dropped. A still-complex result raises ValueError. Float round-off can make
    the exact-zero case (identical sets) come out as about -1e-12; results are floored at 0.
    """
    a, b = _features("feats_a", feats_a), _features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: feats_a has D={a.shape[1]}, feats_b has D={b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))

    def root_of(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
        product = ca @ cb
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; we check the result ourselves
            root = linalg.sqrtm(product)
        return np.asarray(root), product

    def acceptable(root: np.ndarray, product: np.ndarray) -> bool:
        if not np.all(np.isfinite(root)):
            return False
        scale = max(1.0, float(np.abs(root.real).max()))
        if np.iscomplexobj(root) and float(np.abs(root.imag).max()) > 1e-3 * scale:
            return False
        return _sqrtm_relative_error(root.real, product) < 1e-3

    root, product = root_of(cov_a, cov_b)
    if not acceptable(root, product):
        offset = np.eye(cov_a.shape[0]) * eps
        root, product = root_of(cov_a + offset, cov_b + offset)
        if not np.all(np.isfinite(root)):
            raise ValueError("frechet_distance: matrix square root is not finite even with the eps offset")
        if np.iscomplexobj(root):
            scale = max(1.0, float(np.abs(root.real).max()))
            if float(np.abs(root.imag).max()) > 1e-3 * scale:
                raise ValueError(
                    f"frechet_distance: sqrtm(C_a C_b) has imaginary part {np.abs(root.imag).max():.3g} "
                    f"even with eps={eps}: covariances are too ill-conditioned"
                )
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root.real))
    return max(value, 0.0)


def frechet_bootstrap(feats: dict[str, Sequence], reference, *, num_samples: int = 200,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Frechet distances to `reference` over paired bootstrap resamples of the items: {name: [num_samples]}.

    Row i of every feature set and of `reference` belongs to item i (the same prompt and noise: generators sampled
    from the same noise, and the prompt's render), so each sample draws one set of item indices, with replacement,
    for all of them at once. The spread of any function of the distances (a gap closed, a difference between two
    generators) over the samples is its sampling error; `percentile_interval` turns it into an interval.
    """
    ref = _features("reference", reference)
    sets = {name: _features(name, f) for name, f in feats.items()}
    for name, f in sets.items():
        if f.shape != ref.shape:
            raise ValueError(f"{name} has shape {f.shape}, reference {ref.shape}: expected one row per item in both")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} is not allowed: expected an integer >= 1")
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(ref), size=(num_samples, len(ref)))
    return {name: np.array([frechet_distance(f[idx], ref[idx]) for idx in draws]) for name, f in sets.items()}


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """(lo, hi): the central percentile interval of bootstrap samples at `level` (nan samples ignored)."""
    values = _vector("samples", np.asarray(samples, dtype=float)[~np.isnan(np.asarray(samples, dtype=float))])
    if not 0.0 < level < 1.0 or not len(values):
        raise ValueError(f"level={level}, {len(values)} finite samples: expected 0 < level < 1 and at least one")
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


def mean_interval(values, level: float = 0.95) -> dict[str, float]:
    """{mean, se, lo, hi, n}: the mean of independent replicates (e.g. training seeds), its standard error
    (sample sd / sqrt(n)) and Student's t interval at `level`; se, lo and hi are nan with one value."""
    x = _vector("values", values)
    if not 0.0 < level < 1.0 or not len(x):
        raise ValueError(f"level={level}, {len(x)} values: expected 0 < level < 1 and at least one value")
    mean, n = float(np.mean(x)), len(x)
    if n < 2:
        return {"mean": mean, "se": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    se = float(np.std(x, ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2.0, df=n - 1)) * se
    return {"mean": mean, "se": se, "lo": mean - half, "hi": mean + half, "n": n}
