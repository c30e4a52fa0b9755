"""Judging two-step generators against the 8-step teacher and naive 2-step sampling (issue 17's results).

Every generator samples the same held-out prompts from the same noise; the independent judge
(`zray.evaluation.generator.judge_against`) scores each image. Definitions:

- **GSB** of A against B over prompts: Good = A's true alignment above B's on that prompt, Same = equal, Bad =
  below; `net = (G - B) / N` (in [-1, 1]; > 0 means A wins more prompts than it loses).
- **Gap closed** by a student on a metric: `(student - naive) / (teacher - naive)`, where naive is the teacher
  sampled with 2 steps: 1 = as good as the teacher, 0 = no better than naive, negative = worse. It is the same
  formula for a metric where lower is better (Frechet distance). Undefined (nan) when teacher == naive.
- Frechet distances: `zray.evaluation.generator.frechet_to` (fixed colour / layout features, no network).

On prompts the judge cannot read (an import, `data.dir`: it recovers Shapes scenes only) and with no renders,
`unjudged_metrics` keeps what needs neither: the Frechet distance to the 8-step teacher's samples, and its gap
closed (the teacher's own distance is 0); `results_markdown(..., judged=False)` and
`save_variant_grid(..., judged=False)` draw the table and the grid without the judge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zray.config import TURBO_BASELINE
from zray.evaluation.generator import frechet_to, judge_many, summarise
from zray.evaluation.turbo_trajectory import X0_MSE_TO_TEACHER

GAP_METRICS: tuple[str, ...] = ("frechet_to_renders", "main_colour")
# the sign of a change for the worse (X0_MSE_TO_TEACHER: the final latent's distance to the teacher's output from the
# same noise, zray.evaluation.turbo_trajectory)
WORSE_SIGN: dict[str, float] = {"frechet_to_renders": 1.0, "main_colour": -1.0, X0_MSE_TO_TEACHER: 1.0}


def gsb(a_scores: Sequence[float], b_scores: Sequence[float], tol: float = 1e-9) -> dict[str, float]:
    """{good, same, bad} as fractions and `net = good - bad`, comparing A with B prompt by prompt."""
    a, b = np.asarray(a_scores, dtype=float), np.asarray(b_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"scores have shapes {a.shape} and {b.shape}: expected equal 1-D, non-empty")
    good, bad = float(np.mean(a > b + tol)), float(np.mean(a < b - tol))
    return {"good": good, "same": 1.0 - good - bad, "bad": bad, "net": good - bad}


def gap_closed(student: float, naive: float, teacher: float) -> float:
    """`(student - naive) / (teacher - naive)`: the fraction of naive 2-step's gap to the teacher closed."""
    span = teacher - naive
    return float("nan") if abs(span) < 1e-12 else (student - naive) / span


def judge_generator(images: Sequence[Any], prompts: Sequence[str], *, renders: Sequence[Any],
                    teacher_images: Sequence[Any]) -> tuple[dict[str, float], list[float]]:
    """Summary metrics of one generator's images (judge rates, mean alignment, Frechet distances to renders and
    to the teacher's samples) and the per-prompt true alignment (for GSB)."""
    judged = judge_many(images, prompts)
    metrics = {**summarise(judged), "frechet_to_renders": frechet_to(images, renders),
               "frechet_to_teacher": frechet_to(images, teacher_images)}
    return metrics, [j["alignment"] for j in judged]


def unjudged_metrics(images: Sequence[Any], teacher_images: Sequence[Any]) -> dict[str, float]:
    """{num, frechet_to_teacher}: what is measured without the judge and without renders (module docstring)."""
    return {"num": float(len(images)), "frechet_to_teacher": frechet_to(images, teacher_images)}


def gap_closed_to_teacher(metrics: dict[str, float], references: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{gap_closed_frechet_to_teacher}: `gap_closed` on the Frechet distance to the teacher's samples."""
    return {"gap_closed_frechet_to_teacher": gap_closed(metrics["frechet_to_teacher"],
                                                        references["two_step"]["metrics"]["frechet_to_teacher"],
                                                        references["teacher"]["metrics"]["frechet_to_teacher"])}


def compare_to_references(metrics: dict[str, float], alignment: Sequence[float],
                          references: dict[str, dict[str, Any]]) -> dict[str, float]:
    """GSB against the teacher and naive 2-step, and the gap closed on GAP_METRICS; `references` holds
    {"teacher": {"metrics", "alignment"}, "two_step": {...}}."""
    out: dict[str, float] = {}
    for ref in ("teacher", "two_step"):
        for key, value in gsb(alignment, references[ref]["alignment"]).items():
            out[f"gsb_vs_{ref}_{key}"] = value
    for key in GAP_METRICS:
        out[f"gap_closed_{key}"] = gap_closed(metrics[key], references["two_step"]["metrics"][key],
                                              references["teacher"]["metrics"][key])
    return out


def _fmt(value: float, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.1%}" if pct else f"{value:.3f}"


def results_markdown(rows: dict[str, dict[str, float]], *, num_prompts: int, notes: Sequence[str] = (),
                     judged: bool = True) -> str:
    """The results table: one row per generator (teacher, naive 2-step, each Turbo++ variant); `judged=False`:
    the Frechet distance to the teacher and its gap closed only (`unjudged_metrics`)."""
    if not judged:
        return _unjudged_markdown(rows, num_prompts=num_prompts, notes=notes)
    head = ("| generator | steps | main colour | colours exact | alignment | Frechet to renders | Frechet to teacher "
            "| gap closed (Frechet / main colour) | GSB vs teacher (net) | GSB vs naive 2-step (net) | train min |")
    lines = [f"# Turbo++ two-step distillation: {num_prompts} held-out prompts, same noise, the independent judge", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows.items():
        gap = (f"{_fmt(m.get('gap_closed_frechet_to_renders', float('nan')), True)} / "
               f"{_fmt(m.get('gap_closed_main_colour', float('nan')), True)}") if "gap_closed_main_colour" in m else "-"
        gsb_t = _fmt(m["gsb_vs_teacher_net"]) if "gsb_vs_teacher_net" in m else "-"
        gsb_n = _fmt(m["gsb_vs_two_step_net"]) if "gsb_vs_two_step_net" in m else "-"
        train = f"{m['train_s'] / 60:.1f}" if "train_s" in m else "-"
        lines.append(f"| {name} | {int(m['steps'])} | {_fmt(m['main_colour'], True)} | {_fmt(m['colours_exact'], True)} "
                     f"| {m['alignment']:.2f} | {_fmt(m['frechet_to_renders'])} | {_fmt(m['frechet_to_teacher'])} "
                     f"| {gap} | {gsb_t} | {gsb_n} | {train} |")
    lines += ["", "Gap closed = (student - naive) / (teacher - naive) (zray/evaluation/turbo.py); GSB net = share of "
              "prompts where the row's true alignment beats the reference minus the share where it loses."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _unjudged_markdown(rows: dict[str, dict[str, float]], *, num_prompts: int, notes: Sequence[str]) -> str:
    head = "| generator | steps | Frechet to teacher | gap closed (Frechet to teacher) | train min |"
    lines = [f"# Turbo++ two-step distillation: {num_prompts} held-out prompts of the import, same noise, no judge",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows.items():
        gap = _fmt(m["gap_closed_frechet_to_teacher"], True) if "gap_closed_frechet_to_teacher" in m else "-"
        train = f"{m['train_s'] / 60:.1f}" if "train_s" in m else "-"
        lines.append(f"| {name} | {int(m['steps'])} | {_fmt(m['frechet_to_teacher'])} | {gap} | {train} |")
    lines += ["", f"{NO_JUDGE_NOTE} Gap closed = (student - naive) / (teacher - naive) on the Frechet distance to the "
              "teacher's samples (the teacher's own is 0)."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


NO_JUDGE_NOTE = ("The judge recovers Shapes-world scenes only, so on imported prompts (data.dir) main colour, "
                 "alignment, GSB and the gap closed against renders are not measured (there are no renders either); "
                 "what remains is the Frechet distance of each generator's samples to the 8-step teacher's.")


def save_variant_grid(path: Path, prompts: Sequence[str], images: dict[str, Sequence[Any]], num: int = 8,
                      verdicts: dict[str, Sequence[dict[str, float]]] | None = None, judged: bool = True) -> None:
    """One row per prompt, one column per generator (same noise), each image with the judge's alignment. `verdicts`:
    per column, the judge's per-prompt {alignment, main_colour} already computed for those images (judged here for
    the columns without). `judged=False`: no judge at all, the column names only (prompts the judge cannot read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zray.evaluation.generator import judge_against

    names, given = list(images), verdicts or {}
    n = min(num, len(prompts))
    fig, axes = plt.subplots(n, len(names), figsize=(1.9 * len(names), 2.0 * n), squeeze=False)
    for i in range(n):
        for j, name in enumerate(names):
            ax = axes[i, j]
            ax.set_axis_off()
            ax.imshow(images[name][i])
            if not judged:
                if i == 0:
                    ax.set_title(name, fontsize=7)
                continue
            verdict = given[name][i] if name in given else judge_against(images[name][i], prompts[i])
            ax.set_title(f"{name}\nalign {verdict['alignment']:.1f}" if i == 0 else
                         f"align {verdict['alignment']:.1f}", fontsize=7,
                         color="green" if verdict["main_colour"] else "red")
        axes[i, 0].text(-0.05, 0.5, prompts[i], transform=axes[i, 0].transAxes, fontsize=5, ha="right",
                        va="center", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def frechet_intervals(images: dict[str, Sequence[Any]], reference: Sequence[Any], *, baseline: str | None,
                      num_samples: int, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
    """Sampling error of the Frechet figures, by a paired bootstrap over the prompts (`zray.metrics.frechet_bootstrap`:
    every generator sampled prompt i from the same noise, and `reference[i]` is prompt i's render).

    `images` holds "teacher" and "two_step" (naive) and the students. Per student: the interval at `level` of its
    Frechet gap closed, and with `baseline` (another student) of its Frechet distance minus the baseline's
    (negative: closer to the reference than the baseline). {name: {gap_closed_lo, gap_closed_hi[, minus_baseline,
    minus_baseline_lo, minus_baseline_hi]}}.
    """
    from zray.evaluation.generator import image_features
    from zray.metrics import frechet_bootstrap, percentile_interval

    samples = frechet_bootstrap({k: image_features(v) for k, v in images.items()}, image_features(reference),
                                num_samples=num_samples, seed=seed)
    naive, teacher = samples["two_step"], samples["teacher"]
    span = naive - teacher
    out: dict[str, dict[str, float]] = {}
    for name, fd in samples.items():
        if name in ("teacher", "two_step"):
            continue
        gap = np.where(np.abs(span) > 1e-12, (naive - fd) / np.where(np.abs(span) > 1e-12, span, 1.0), np.nan)
        lo, hi = percentile_interval(gap, level)
        out[name] = {"gap_closed_lo": lo, "gap_closed_hi": hi}
        if baseline is not None and name != baseline and baseline in samples:
            diff = fd - samples[baseline]
            d_lo, d_hi = percentile_interval(diff, level)
            out[name].update(minus_baseline=float(np.median(diff)), minus_baseline_lo=d_lo, minus_baseline_hi=d_hi)
    return out


def interval_notes(intervals: dict[str, dict[str, float]], *, baseline: str | None, num_prompts: int,
                   num_samples: int) -> list[str]:
    """results.md lines for `frechet_intervals`."""
    if not intervals:
        return []
    lines = [f"95% intervals, paired bootstrap over the {num_prompts} prompts ({num_samples} samples): Frechet gap "
             "closed " + "; ".join(f"{n} [{v['gap_closed_lo']:.0%}, {v['gap_closed_hi']:.0%}]"
                                   for n, v in intervals.items()) + "."]
    diffs = {n: v for n, v in intervals.items() if "minus_baseline" in v}
    if diffs:
        lines.append(f"Frechet to renders minus {baseline}'s (negative: closer to the renders): " + "; ".join(
            f"{n} {v['minus_baseline']:+.3f} [{v['minus_baseline_lo']:+.3f}, {v['minus_baseline_hi']:+.3f}]"
            for n, v in diffs.items()) + ".")
    return lines


SEED_METRICS: tuple[str, ...] = (*GAP_METRICS, X0_MSE_TO_TEACHER)  # the last one where the runs have it
_SEED_LABELS = {"frechet_to_renders": ("Frechet to renders", False, 3), "main_colour": ("main colour", True, 1),
                X0_MSE_TO_TEACHER: ("final latent MSE to the teacher", False, 5)}  # label, percent, decimals


def _seed_cell(value: float, key: str, sign: str = "") -> str:
    """One figure of `key` in the summary over seeds, as _SEED_LABELS formats it (`sign="+"` for differences)."""
    _, pct, places = _SEED_LABELS[key]
    return f"{value:{sign}.{places}%}" if pct else f"{value:{sign}.{places}f}"


def seed_summary(rows: dict[str, dict[str, float]], variants: Sequence[str], seeds: int, *,
                 baseline: str = TURBO_BASELINE) -> dict[str, dict[str, Any]]:
    """Each variant over its training seeds (`rows` keyed by `seed_run_name(variant, k)`, k < seeds): the mean and
    t interval (`zray.metrics.mean_interval`) of each of SEED_METRICS that every run has (its Frechet distance to
    the renders, main-colour rate, and final latent distance to the teacher where the rows carry
    `zray.evaluation.turbo_trajectory`'s figures), and for a variant other than `baseline` its difference from the
    baseline's run of the same seed, seed by seed, with how many seeds it is worse in (`WORSE_SIGN`)."""
    from zray.metrics import mean_interval
    from zray.training.runs import seed_run_name

    def runs(variant: str) -> list[dict[str, float]]:
        return [rows[seed_run_name(variant, k)] for k in range(seeds)]

    everyone = [r for v in variants for r in runs(v)]
    keys = [key for key in SEED_METRICS if all(key in r for r in everyone)]
    out: dict[str, dict[str, Any]] = {}
    for variant in variants:
        mine = runs(variant)
        entry: dict[str, Any] = {key: mean_interval([m[key] for m in mine]) for key in keys}
        if variant != baseline and baseline in variants:
            for key in keys:
                diffs = [m[key] - b[key] for m, b in zip(mine, runs(baseline))]
                entry[f"{key}_minus_{baseline}"] = {**mean_interval(diffs), "by_seed": diffs,
                                                    "worse_in": sum(WORSE_SIGN[key] * d > 0 for d in diffs)}
        out[variant] = entry
    return out


def seed_markdown(summary: dict[str, dict[str, Any]], *, baseline: str = TURBO_BASELINE) -> list[str]:
    """results.md's table of `seed_summary`: one row per variant, 95% t intervals over the seeds."""
    keys = [key for key in SEED_METRICS if key in next(iter(summary.values()))]
    head = ("| variant | seeds | " + " | ".join(f"{_SEED_LABELS[k][0]}, mean [95%]" for k in keys) + " | "
            + " | ".join(f"{_SEED_LABELS[k][0]} minus {baseline}'s, by seed | mean [95%] | worse in" for k in keys)
            + " |")
    lines = ["", "## Over training seeds (mean and Student's t 95% interval across seeds; the bootstrap above "
             "holds each trained model fixed)", "", head, "|" + "---|" * (head.count("|") - 1)]

    def ci(d: dict[str, float], key: str, sign: str = "") -> str:
        mean, lo, hi = (_seed_cell(d[k], key, sign) for k in ("mean", "lo", "hi"))
        return f"{mean} [{lo}, {hi}]" if d["n"] > 1 else mean

    for variant, e in summary.items():
        cells = [variant, str(e[keys[0]]["n"]), *(ci(e[k], k) for k in keys)]
        for key in keys:
            d = e.get(f"{key}_minus_{baseline}")
            if d is None:
                cells += ["-", "-", "-"]
                continue
            by_seed = ", ".join(_seed_cell(v, key, "+") for v in d["by_seed"])
            cells += [by_seed, ci(d, key, "+"), f"{d['worse_in']} of {d['n']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"A variant is worse than {baseline} beyond the spread between training runs where its interval "
              "of the difference excludes 0 on the worse side; with few seeds the t interval is wide."]
    return lines
