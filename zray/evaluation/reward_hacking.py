"""Reward hacking watch for reward-gradient fine-tuning: the student reward beside the judge's true score.

At every evaluation of `zray reward-finetune` the same held-out prompts are sampled from the same noise and scored
twice: by the frozen student the generator is trained on (mu per dimension, and R = sum_d w_d mu_d) and by the
independent judge (`zray.evaluation.generator.judge_many`: the world's true alignment of the recovered scene,
1..5). The student's alignment mu is on the same 1..5 scale, so

    gap_t = (mu_align_t - judge_align_t) - (mu_align_0 - judge_align_0)

is how far the student's alignment has run ahead of the truth since the first evaluation (t = 0: before any
update). A widening gap is reward hacking: the generator found what the student over-rates.

The gap misses hacking whose student reward hardly moves, or whose judge alignment starts near its floor of 1 (it
cannot fall far): the images get worse by the judge while the gap stays small. So the judge's own decline is
watched too:

    decline_t = max(-net GSB_t vs the first evaluation, main-colour rate_0 - main-colour rate_t)

both shares of the held-out prompts (net GSB on the judge's alignment, prompt by prompt; the main colour is the
judge's per-prompt verdict that the prompt's main object has its colour). `alarm` says which of the two passed its
threshold first; `watched` is the records with both, and their GSB against the first.

Whether the updates helped in truth is the GSB of each evaluation against the first one (`with_gsb`): prompt by
prompt, on the judge's true alignment alone (the definition of `zray.evaluation.turbo.gsb`, as distill-generator's
GSB against the teacher and naive 2-step). Numpy and matplotlib only (the images and scores come from the caller).

On an import's prompts (`data.dir`) the judge cannot score (it recovers Shapes scenes only): `judge_watch` says the
watch is off (and refuses `on_gap="stop"`, which would never fire), and each evaluation is `student_record` alone
(the student's mean mu per dimension and R, and R per prompt); the plot shows the student's reward only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zray.config import ConfigError
from zray.evaluation.generator import judge_many, summarise
from zray.evaluation.turbo import gsb

GAP_DIMENSION = "alignment"  # the one dimension the judge measures


def judge_watch(data_dir: str, on_gap: str, dimensions: Sequence[str]) -> bool:
    """Whether the judge watches the run for reward hacking: on the Shapes world (no `data_dir`) it does, and needs
    'alignment' among the reward's dimensions; on an import it cannot, so `on_gap="stop"` is refused (ConfigError)."""
    if data_dir:
        if on_gap == "stop":
            raise ConfigError(f"reward_finetune.on_gap='stop' is not allowed with data.dir={data_dir!r}: the judge "
                              "scores Shapes-world prompts only, so no reward-hacking watch runs on an import and "
                              "nothing could stop the run; expected on_gap='warn' (set --set reward_finetune.on_gap=warn;"
                              " the student's reward is recorded alone)")
        return False
    if GAP_DIMENSION not in dimensions:
        raise ConfigError(f"reward_finetune.dimensions={tuple(dimensions)!r} is not allowed on the Shapes world: "
                          f"expected {GAP_DIMENSION!r} among them (the reward-hacking watch compares it with the "
                          "judge; weight it 0 to train on the others only)")
    return True


def student_record(step: int, mu_BD: np.ndarray, dimensions: Sequence[str],
                   weights: Sequence[float]) -> dict[str, Any]:
    """One evaluation without the judge: the student's mean mu per dimension, mean R and R per prompt."""
    mu_BD = np.asarray(mu_BD, dtype=np.float64)
    if mu_BD.ndim != 2 or mu_BD.shape[1] != len(dimensions) or len(weights) != len(dimensions):
        raise ValueError(f"mu of shape {mu_BD.shape} and {len(weights)} weights: expected (B, {len(dimensions)}) "
                         f"and one weight per dimension of {tuple(dimensions)}")
    reward_B = mu_BD @ np.asarray(weights, dtype=np.float64)
    return {"step": int(step), "student": {d: float(mu_BD[:, j].mean()) for j, d in enumerate(dimensions)},
            "student_reward": float(reward_B.mean()), "per_prompt": {"student_reward": [float(v) for v in reward_B]}}


def evaluation_record(step: int, images: Sequence[Any], prompts: Sequence[str], mu_BD: np.ndarray,
                      dimensions: Sequence[str], weights: Sequence[float]) -> dict[str, Any]:
    """One evaluation: the student's mean mu per dimension and mean R, the judge's summary, per-prompt alignments
    (student and judge) and the judge's per-prompt main-colour verdict."""
    mu_BD = np.asarray(mu_BD, dtype=np.float64)
    if mu_BD.shape != (len(prompts), len(dimensions)) or len(images) != len(prompts):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and mu of shape {mu_BD.shape}: expected "
                         f"({len(prompts)}, {len(dimensions)}) and one image per prompt")
    if GAP_DIMENSION not in dimensions:
        raise ValueError(f"dimensions={tuple(dimensions)} is not allowed: expected {GAP_DIMENSION!r} among them (the "
                         "judge measures alignment only)")
    judged = judge_many(images, prompts)
    align = list(dimensions).index(GAP_DIMENSION)
    return {"step": int(step),
            "student": {d: float(mu_BD[:, j].mean()) for j, d in enumerate(dimensions)},
            "student_reward": float((mu_BD @ np.asarray(weights, dtype=np.float64)).mean()),
            "judge": summarise(judged),
            "per_prompt": {"student_alignment": [float(v) for v in mu_BD[:, align]],
                           "judge_alignment": [float(j["alignment"]) for j in judged],
                           "judge_main_colour": [float(j["main_colour"]) for j in judged]}}


def judge_verdicts(record: dict[str, Any]) -> list[dict[str, float]] | None:
    """The judge's per-prompt {alignment, main_colour} of an evaluation (for `save_variant_grid`), or None for a
    record written before the main colour was kept per prompt."""
    per_prompt = record["per_prompt"]
    if "judge_main_colour" not in per_prompt:
        return None
    return [{"alignment": a, "main_colour": m} for a, m in zip(per_prompt["judge_alignment"],
                                                               per_prompt["judge_main_colour"])]


def gap(record: dict[str, Any], first: dict[str, Any]) -> float:
    """gap_t of the module docstring: (student - judge alignment) now minus the same at the first evaluation."""
    def raw(r: dict[str, Any]) -> float:
        return r["student"][GAP_DIMENSION] - r["judge"]["alignment"]
    return raw(record) - raw(first)


def with_gaps(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, each with its `gap` (relative to the first record)."""
    return [{**r, "gap": gap(r, records[0])} for r in records] if records else []


def gsb_vs_first(record: dict[str, Any], first: dict[str, Any]) -> dict[str, float]:
    """{good, same, bad, net} of `record` against `first` (`zray.evaluation.turbo.gsb`) on the judge's per-prompt
    true alignment (`per_prompt.judge_alignment`: the same prompts from the same noise)."""
    now, then = record["per_prompt"]["judge_alignment"], first["per_prompt"]["judge_alignment"]
    if len(now) != len(then):
        raise ValueError(f"step {record['step']} has {len(now)} judged prompts and step {first['step']} {len(then)}: "
                         "expected the same held-out prompts at every evaluation")
    return gsb(now, then)


def with_gsb(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, each with its `gsb_vs_start` (GSB against the first record; the first's is all Same)."""
    return [{**r, "gsb_vs_start": gsb_vs_first(r, records[0])} for r in records] if records else []


def main_colour_rate(record: dict[str, Any]) -> float | None:
    """The share of prompts whose image the judge finds with its main colour; None for a record without it."""
    rates = record["per_prompt"].get("judge_main_colour")
    return float(np.mean(rates)) if rates else None


def decline(record: dict[str, Any], first: dict[str, Any]) -> float:
    """decline_t of the module docstring: how far the judge's verdicts fell since `first` (a share of prompts;
    0 or less: no decline)."""
    drops = [-gsb_vs_first(record, first)["net"]]
    now, then = main_colour_rate(record), main_colour_rate(first)
    if now is not None and then is not None:
        drops.append(then - now)
    return max(drops)


def with_declines(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, each with its `decline` (relative to the first record)."""
    return [{**r, "decline": decline(r, records[0])} for r in records] if records else []


def watched(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, each with its `gap`, `decline` and `gsb_vs_start` (all relative to the first record)."""
    return with_gsb(with_declines(with_gaps(records)))


def alarm(records: Sequence[dict[str, Any]], gap_threshold: float,
          decline_threshold: float) -> tuple[dict[str, Any], str] | None:
    """(the first record past a threshold, why) or None: its gap above `gap_threshold`, or its judge decline
    above `decline_threshold` (0 = not watched). The record carries its `gap`, and its `decline` when watched."""
    if gap_threshold <= 0:
        raise ValueError(f"gap_threshold={gap_threshold} is not allowed: expected a float > 0")
    if decline_threshold < 0:
        raise ValueError(f"decline_threshold={decline_threshold} is not allowed: expected a float >= 0 (0 = off)")
    for r in with_gaps(records):
        if r["gap"] > gap_threshold:
            return r, f"the gap reached {r['gap']:+.3f} (threshold {gap_threshold:g})"
        if not decline_threshold:
            continue
        r = {**r, "decline": decline(r, records[0])}
        if r["decline"] > decline_threshold:
            net = gsb_vs_first(r, records[0])["net"]
            now, then = main_colour_rate(r), main_colour_rate(records[0])
            colour = f", main colour {then:.1%} -> {now:.1%}" if now is not None and then is not None else ""
            return r, (f"the judge's verdicts fell by {r['decline']:.3f} of the prompts (threshold "
                       f"{decline_threshold:g}; net GSB vs step 0 {net:+.3f}{colour})")
    return None


def save_reward_vs_judge(path: Path, records: Sequence[dict[str, Any]], threshold: float, title: str,
                         history: Sequence[dict[str, float]] = (), decline_threshold: float = 0.0) -> None:
    """Student reward R, student alignment mu and judge alignment against step (held-out prompts; with `history`,
    the learner's logged training reward too); below, the gap and the judge's decline with their thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = all("judge" in r for r in records)  # False: an import's prompts, the student's reward alone
    records = with_declines(with_gaps(records)) if judged else list(records)
    steps = [r["step"] for r in records]
    if judged:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True, height_ratios=(2, 1))
    else:
        fig, top = plt.subplots(1, 1, figsize=(6.4, 3.6))
    top.plot(steps, [r["student_reward"] for r in records], "o-", label="student reward R (trained on)")
    if judged:
        top.plot(steps, [r["student"][GAP_DIMENSION] for r in records], "s--", label="student alignment mu")
        top.plot(steps, [r["judge"]["alignment"] for r in records], "^-", label="judge alignment (true)")
    trained = [h for h in history if "reward" in h]
    if trained:
        top.plot([h["step"] for h in trained], [h["reward"] for h in trained], color="gray", alpha=0.5, lw=1,
                 label="student reward R, training batches")
    top.set_ylabel("score (1..5)")
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    top.set_title(title, fontsize=9)
    if not judged:
        top.set_xlabel("learner step")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    bottom.plot(steps, [r["gap"] for r in records], "o-", color="tab:red", label="gap (relative to step 0)")
    bottom.axhline(threshold, color="tab:red", alpha=0.5, linestyle=":", label=f"gap threshold {threshold:g}")
    bottom.plot(steps, [r["decline"] for r in records], "s-", color="tab:purple",
                label="judge decline (share of prompts)")
    if decline_threshold:
        bottom.axhline(decline_threshold, color="tab:purple", alpha=0.5, linestyle=":",
                       label=f"decline threshold {decline_threshold:g}")
    bottom.set_xlabel("learner step")
    bottom.set_ylabel("gap / decline")
    bottom.legend(fontsize=7)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
