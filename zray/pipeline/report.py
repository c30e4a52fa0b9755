"""The run's `report.md`: one page that says what the pipeline did and what came out of it.

    write_report(out_dir, cfg, actions) -> Path

Built only from what the stages wrote (their records in `<out_dir>/pipeline/` and their own tables and plots), so a
report can be re-made at any time and never states a figure no stage measured:

1. the stage table: status (done / running / not run), how the last invocation treated it (ran, resumed, skipped,
   re-ran), wall time, attempts, folder;
2. per stage, its own Markdown table (`STAGE_TABLES`; headings shifted down, image links re-pointed) and every plot
   it wrote (its folder and one level below, checkpoints excluded), embedded as images.

A `tiny` run gets a banner: its models are a few steps of tiny networks, so its numbers are smoke.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from zray.config import RunConfig
from zray.pipeline.plan import STAGES, read_record
from zray.training.runs import write_json_atomic, write_text_atomic

REPORT_FILE = "report.md"
STAGE_TABLES: dict[str, tuple[str, ...]] = {  # each stage's own Markdown, relative to the run dir
    "data": (),
    "pretrain_vlm": ("pretrain_vlm/summary.md",),
    "pretrain_generator": ("pretrain_generator/summary.md",),
    "train_teacher": ("train_teacher/results.md",),
    "train_student": ("train_student/results.md",),
    "serve": ("serve/summary.md",),
    "distill_generator": ("distill_generator/results.md",),
    "reward_finetune": ("reward_finetune/turbo/summary.md",),
}
SKIP_PARTS = ("checkpoint_", "tensorboard", "superseded", "teacher_samples", "train")


def stage_table(records: dict[str, dict[str, Any] | None], actions: dict[str, str]) -> tuple[str, float]:
    """The Markdown table of every stage's record (None: not run), and the total wall time of the stages that are
    done."""
    lines = ["| stage | what | status | this invocation | wall time | attempts | folder |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    for stage in STAGES:
        record = records[stage.name]
        status = record["status"] if record else "not run"
        wall = float(record.get("wall_s", 0.0)) if record else 0.0
        if record and status == "done":
            total += wall
        shown = f"{wall / 60:.1f} min" if wall >= 60 else (f"{wall:.0f} s" if record else "-")
        lines.append(f"| {stage.name} | {stage.title} | {status} | {actions.get(stage.name, '-')} | {shown} | "
                     f"{record.get('attempts', 1) if record else '-'} | `{stage.name}/` |")
    return "\n".join(lines), total


def inline_markdown(path: Path, out_dir: Path) -> str:
    """A stage's Markdown under the report's stage heading: headings two levels down, relative image links made
    relative to the run dir."""
    text = path.read_text()
    text = re.sub(r"^(#{1,4}) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
    base = path.parent.relative_to(out_dir).as_posix()

    def relink(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^[a-z]+://|^/", target):
            return match.group(0)
        return f"{match.group(1)}({base}/{target})"

    return re.sub(r"(!\[[^\]]*\])\(([^)]+)\)", relink, text).strip()


def stage_plots(folder: Path) -> list[Path]:
    """The stage's PNGs: in its folder and one level below, not in checkpoints, TensorBoard logs or caches."""
    found = [*folder.glob("*.png"), *folder.glob("*/*.png"), *folder.glob("*/*/*.png")]
    rel = [p for p in found if not any(part.startswith(SKIP_PARTS) for part in p.relative_to(folder).parts[:-1])]
    return sorted(rel)


def write_report(out_dir: str | os.PathLike, cfg: RunConfig, actions: dict[str, str] | None = None) -> Path:
    """Write `<out_dir>/report.md` (and `pipeline/summary.json`, the stage records in one file); returns its path."""
    out = Path(out_dir)
    actions = actions or {}
    records = {stage.name: read_record(out, stage.name) for stage in STAGES}
    table, total = stage_table(records, actions)
    parts = [f"# zray run: recipe `{cfg.name}`", "",
             f"Run directory `{out}`; report written {time.strftime('%Y-%m-%d %H:%M:%S')}. Stages run in the order "
             "below; a stage is skipped when its output exists and its recorded config matches (`pipeline/<stage>.json`).",
             ""]
    if cfg.size == "tiny":
        parts += ["> **Smoke run.** The `tiny` recipes train tiny networks for a few steps: every number below shows "
                  "that the stage ran end to end, not how well the method works. The `dev` recipe gives the real "
                  "tables (docs/experiments.md).", ""]
    parts += ["## Stages", "", table, "", f"Total wall time of the finished stages: {total / 60:.1f} min.", ""]
    for stage in STAGES:
        record = records[stage.name]
        folder = out / stage.name
        if not record or not folder.exists():
            continue
        parts += [f"## {stage.title} (`{stage.name}`)", ""]
        for rel in STAGE_TABLES[stage.name]:
            if (out / rel).exists():
                parts += [inline_markdown(out / rel, out), ""]
        summary = record.get("summary") or {}
        if summary and not STAGE_TABLES[stage.name]:
            parts += [", ".join(f"{k}: {v}" for k, v in summary.items()), ""]
        for plot in stage_plots(folder):
            rel = plot.relative_to(out).as_posix()
            parts += [f"![{rel}]({rel})", ""]
    path = write_text_atomic(out / REPORT_FILE, "\n".join(parts).rstrip() + "\n")
    write_json_atomic(out / "pipeline" / "summary.json", {"recipe": cfg.name, "stages": records, "actions": actions})
    return path


def first_table(report: Path) -> str:
    """The report's first Markdown table (the stage table), for printing at the end of a run."""
    lines, inside = [], False
    for line in report.read_text().splitlines():
        if line.startswith("|"):
            inside = True
            lines.append(line)
        elif inside:
            break
    return "\n".join(lines)


def summary_of(result: Any) -> dict[str, Any]:
    """A short, JSON-ready summary of what a stage's job returned (numbers and strings at the top level)."""
    if not isinstance(result, dict):
        return {}
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
