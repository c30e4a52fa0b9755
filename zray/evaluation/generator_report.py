"""Pictures and the Markdown summary of `zray pretrain-generator` (jobs/pretrain_generator.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zray.data.prompt_grammar import parse_prompt
from zray.data.render import decode_png
from zray.evaluation.generator import judge_against, main_colour


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _verdict(image: Any, prompt: str) -> tuple[str, str]:
    j = judge_against(image, prompt)
    marks = [name for name, key in (("bg", "background"), ("colour", "main_colour")) if not j[key]]
    text = f"align {j['alignment']:.1f}" + (" | wrong " + ", ".join(marks) if marks else "")
    return text, "green" if not marks else "red"


def save_sample_grid(path: Path, rows: list[dict[str, Any]], samples: dict[str, Any], steps: int) -> None:
    """One row per prompt: reference render | N-step sample | 2-step sample (same noise), judged."""
    plt = _plt()
    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(7.6, 2.0 * n), squeeze=False)
    columns = (("reference render", None), (f"{steps}-step", "teacher"), ("2-step", "two_step"))
    for i, row in enumerate(rows):
        for j, (title, key) in enumerate(columns):
            ax = axes[i, j]
            ax.set_axis_off()
            image = decode_png(row["image"]) if key is None else samples["images"][key][i]
            ax.imshow(image)
            text, colour = _verdict(image, row["prompt"])
            ax.set_title(f"{title}: {text}", fontsize=6.5, color=colour)
        axes[i, 0].set_ylabel(_wrap(row["prompt"], 24), fontsize=6, rotation=0, ha="right", va="center")
        axes[i, 0].set_axis_on()
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
    fig.suptitle(f"held-out prompts: {steps}-step vs 2-step from the same noise", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def save_reconstruction_grid(path: Path, rows: list[dict[str, Any]], reconstructions: list[Any]) -> None:
    """Pairs of held-out render and VAE reconstruction, with the judge's verdict on the reconstruction."""
    plt = _plt()
    cols = 4
    n = len(rows)
    grid_rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(grid_rows, 2 * cols, figsize=(1.6 * 2 * cols, 1.9 * grid_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (row, recon) in enumerate(zip(rows, reconstructions)):
        a, b = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        a.imshow(decode_png(row["image"]))
        a.set_title(f"wants {main_colour(parse_prompt(row['prompt']))}", fontsize=6)
        b.imshow(recon)
        text, colour = _verdict(recon, row["prompt"])
        b.set_title(text, fontsize=6, color=colour)
    fig.suptitle("VAE: held-out render | reconstruction", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def save_loss_curves(path: Path, vae_history: list[dict[str, float]], flow_history: list[dict[str, float]]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, history, title, ylabel in ((axes[0], vae_history, "VAE", "weighted L1 + L2 (+ KL)"),
                                       (axes[1], flow_history, "flow transformer", "flow-matching MSE")):
        if history:
            ax.plot([h["step"] for h in history], [h["loss"] for h in history], color="C0")
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _wrap(text: str, width: int = 48) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def summary_markdown(record: dict[str, Any]) -> str:
    vae, flow, samples, renders = record["vae"], record["flow"], record["samples"], record["renders"]
    ev = vae["eval"]
    lines = [
        "# Base generator pre-training (Shapes world)", "",
        f"Pipeline: `{record['pipeline_dir']}` (loads with `ZImagePipeline.from_pretrained`); parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in record["num_params"].items())
        + f"; total {record['total_s'] / 60:.1f} min.",
        "", "## VAE (before the transformer trains)", "",
        f"{vae['steps']} steps, {vae['train_s'] / 60:.1f} min of training; latents shifted by "
        f"{vae['latent_shift']:.3f} and scaled by {vae['latent_scale']:.3f}.", "",
        "| held-out images | colour kept (main colour) | colours exact | background | alignment | PSNR dB |",
        "|---|---|---|---|---|---|",
        f"| {int(ev['num'])} | {ev['main_colour']:.1%} | {ev['colours_exact']:.1%} | {ev['background']:.1%} | "
        f"{ev['alignment']:.2f} | {ev['psnr']:.1f} |",
        "", "## Samples on held-out prompts (judge)", "",
        f"Flow transformer: {flow['steps']} steps, {flow['train_s'] / 60:.1f} min of training. Same noise for both "
        f"rows; zray's sampler vs `ZImagePipeline.__call__`: max difference "
        f"{samples['pipeline_max_abs_diff_255']:.2f} / 255.", "",
        "| images | steps | background | main colour | colours exact | alignment | Frechet to renders |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in (("teacher", "teacher samples"), ("two_step", "same model, 2 steps")):
        m = samples[key]
        lines.append(f"| {name} | {m['steps']} | {m['background']:.1%} | {m['main_colour']:.1%} | "
                     f"{m['colours_exact']:.1%} | {m['alignment']:.2f} | {m['frechet_to_renders']:.3f} |")
    lines.append(f"| reference renders (judge's ceiling) | - | {renders['background']:.1%} | "
                 f"{renders['main_colour']:.1%} | {renders['colours_exact']:.1%} | {renders['alignment']:.2f} | 0 |")
    lines += ["", f"Frechet distance of 2-step to {samples['teacher']['steps']}-step samples: "
              f"{samples['two_step']['frechet_to_teacher']:.3f}. Features and metric definitions: "
              "`zray/evaluation/generator.py`."]
    return "\n".join(lines) + "\n"
