"""`zray reward-finetune`: reward-gradient fine-tuning of a generator on the frozen differentiable student reward
(methods.md §5), watched for reward hacking by the independent judge.

    zray reward-finetune --recipe dev --generator base            # the 8-step base generator of pretrain-generator
    zray reward-finetune --recipe dev --generator turbo           # the Turbo++ student of distill-generator
    zray reward-finetune --recipe dev --generator base --resume   # continue from the latest checkpoint
    zray reward-finetune --generator-dir DIR --reward-dir DIR     # explicit generator / student reward

Inputs: the generator (`--generator-dir`, else `reward_finetune.generator_dir`, else this run's
`pretrain_generator/pipeline` for "base" or `distill_generator/turbo/final` for "turbo"), the pipeline that holds
the VAE, text encoder and tokenizer (`reward_finetune.pipeline_dir`, else the base generator's own pipeline, else
this run's pretrain-generator pipeline),
and the student reward (`--reward-dir`, else `reward_finetune.reward_dir`, else `train_student/risd/final`).

The loop: evaluate the generator as given (step 0), then train `reward_finetune.eval_every` steps at a time with
the generic learner (`actors.learner.fit` with `max_steps` at the segment's end; each later segment resumes the
previous one's checkpoint), and after each segment sample the same held-out prompts (generator_test) from the same
noise and score them with the student reward and the judge (`zray.evaluation.reward_hacking`). When the gap
(student alignment minus judge alignment, relative to step 0) exceeds `gap_threshold`, or the judge's verdicts
fall by more than `decline_threshold` of the prompts (net GSB against step 0, or the main-colour rate), the run
stops (`on_gap="stop"`, the default) or prints a warning and goes on (`"warn"`). Each evaluation also holds its GSB
against step 0 (`gsb_vs_start`: good / same / bad fractions of the held-out prompts and net = good - bad, on the
judge's per-prompt true alignment alone, `zray.evaluation.turbo.gsb` as distill-generator uses it): net > 0 with no
widening gap is issue 17's "reward gradient raised the true alignment without hacking".

The grid (first NUM_GRID held-out prompts, same noise): for "turbo", the base pipeline (`pipeline_dir`) sampled with
`base_steps` (teacher) and naively with 2 steps (`zray.models.generator.sample_images`), the Turbo++ student as
given (step 0) and after reward-gradient updates (the last evaluation); for "base", the base generator as given and
after. The images of the first and latest evaluation are kept from the evaluations, with their judge verdicts; only
a resumed run re-samples the ones it did not evaluate itself (the task's own sampler, the same noise).

Outputs under `<out_dir>/reward_finetune/<generator>/`: `train/` (the Ray Train run: checkpoints, `tensorboard/`,
`final/`: the fine-tuned weights, layout in `zray/models/reward_generator.py`: LoRA in diffusers' pipeline LoRA
format, or the full network), `reward_vs_judge.json` and `.png` (every evaluation), `grid.png` (the grid above,
each image with the judge's alignment), `metrics.json` (`evaluations`: every evaluation with its `gap` and
`gsb_vs_start`; `gsb_vs_start`: the last one's), `summary.md` (the table with GSB against step 0, the verdict).

With `data.dir` (a `zray data import --kind prompts` folder) the training prompts are the import's train split and
the held-out prompts its test split (`zray.data.imported`). The judge cannot score them: no reward-hacking watch
(`zray.evaluation.reward_hacking.judge_watch` refuses `on_gap="stop"`; set "warn"), no GSB, and each evaluation
records the student's reward alone (`student_record`); the grid has no judge labels, and `fm_weight` (world renders)
is refused. The reward's dimensions are its rubric's (`zray_rubric.json`; `zray.tasks.reward_grad.reward_dimensions`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from zray.config import ConfigError, RunConfig, to_dict
from zray.data import ensure_world, head_rows, read_ray_dataset
from zray.evaluation.reward_hacking import (alarm, evaluation_record, judge_verdicts, judge_watch,
                                            save_reward_vs_judge, student_record, watched)
from zray.evaluation.turbo import save_variant_grid
from zray.models.generator import load_zimage, sample_images, to_pil
from zray.training.runs import (export_final, has_checkpoint, latest_checkpoint, read_learner_state, trained_seconds,
                                write_text_atomic)

GENERATORS = ("base", "turbo")
RUN_NAME = "train"
RECORDS_FILE = "reward_vs_judge.json"
NUM_GRID = 8  # prompts (rows) in grid.png


def input_dirs(cfg: RunConfig, generator: str, generator_dir: str | None,
               reward_dir: str | None) -> tuple[Path, Path, Path]:
    """(generator, pipeline, reward) dirs: the flag, else the config field, else this run's own; ConfigError naming
    the field and the job that makes it when one is missing."""
    rcfg, out = cfg.reward_finetune, Path(cfg.out_dir).resolve()
    pipeline_default = out / "pretrain_generator" / "pipeline"
    default_gen = pipeline_default if generator == "base" else out / "distill_generator" / "turbo" / "final"
    made_by = {"base": "zray pretrain-generator", "turbo": "zray distill-generator"}[generator]
    gen_given = generator_dir or rcfg.generator_dir
    if generator == "base" and gen_given and not rcfg.pipeline_dir:  # the base pipeline holds its VAE and encoder
        pipeline_default = Path(gen_given).resolve()
    checks = (("generator_dir", gen_given, default_gen,
               "model_index.json" if generator == "base" else "turbo_student.json", made_by),
              ("pipeline_dir", rcfg.pipeline_dir, pipeline_default, "model_index.json", "zray pretrain-generator"),
              ("reward_dir", reward_dir or rcfg.reward_dir, out / "train_student" / "risd" / "final", "config.json",
               "zray train-student --method risd"))
    found = []
    for name, given, default, marker, job in checks:
        path = Path(given).resolve() if given else default
        if not (path / marker).is_file():
            raise ConfigError(f"reward_finetune.{name}={str(path)!r} is not allowed: no {marker} there"
                              + ("" if given else f" (run `{job} --recipe {cfg.name}` first, or set it)"))
        found.append(path)
    from zray.models.generator import check_generator_architecture
    from zray.models.vlm import check_vlm_architecture

    if generator == "base":  # a turbo student is zray's own TwoStepStudent layout (turbo_student.json)
        check_generator_architecture(found[0], "reward_finetune.generator_dir")
    check_generator_architecture(found[1], "reward_finetune.pipeline_dir")
    check_vlm_architecture(found[2], "reward_finetune.reward_dir")
    scoring = found[2] / "zray_scoring.json"
    form = json.loads(scoring.read_text()).get("form") if scoring.is_file() else "direct"
    if form != "direct":
        raise ConfigError(f"reward_finetune.reward_dir={str(found[2])!r} is not allowed: {scoring} says form "
                          f"{form!r}; the differentiable reward scores in one token: expected a direct-form student "
                          "(RISD or SFT)")
    return found[0], found[1], found[2]


def run_reward_finetune(cfg: RunConfig, generator: str = "base", *, generator_dir: str | None = None,
                        reward_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate after every segment, stop on reward hacking; returns the record (metrics.json)."""
    from actors.learner import fit, init_ray
    from zray.tasks.reward_grad import RewardGradTask

    if generator not in GENERATORS:
        raise ConfigError(f"--generator {generator!r} is not allowed: expected one of {', '.join(GENERATORS)}")
    rcfg, lcfg = cfg.reward_finetune, cfg.reward_finetune.learner
    if generator == "turbo":  # the student's sampler has two steps (the config checks against base_steps)
        for name in ("k_min", "k_max", "draft_k"):
            if getattr(rcfg, name) > 2:
                raise ConfigError(f"reward_finetune.{name}={getattr(rcfg, name)} is not allowed with --generator "
                                  "turbo: the Turbo++ student samples in 2 steps; expected at most 2")
    if cfg.data.dir:  # what an import's prompts cannot give, refused before any input is read
        judge_watch(cfg.data.dir, rcfg.on_gap, ())
        if rcfg.fm_weight > 0:
            raise ConfigError(f"reward_finetune.fm_weight={rcfg.fm_weight} is not allowed with data.dir="
                              f"{cfg.data.dir!r}: the flow-matching regulariser trains on the world's renders and a "
                              "prompts import has none; expected 0")
    out = Path(cfg.out_dir).resolve()
    root = out / "reward_finetune" / generator
    run_dir = root / RUN_NAME
    gen_dir, pipeline_dir, rew_dir = input_dirs(cfg, generator, generator_dir, reward_dir)
    if not resume and has_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir} holds checkpoints of an earlier run: pass --resume to continue it, or "
                              "remove it")
    started = time.perf_counter()
    task = RewardGradTask(rcfg, kind=generator, generator_dir=gen_dir, pipeline_dir=pipeline_dir, reward_dir=rew_dir,
                          image_size=cfg.world.image_size)  # the reward's rubric: dimensions and weights checked
    watch = judge_watch(cfg.data.dir, rcfg.on_gap, task.dimensions)
    if cfg.data.dir:
        from zray.data.imported import imported_prompts, prompt_rows

        eval_rows = prompt_rows(cfg.data, "test", rcfg.num_eval_prompts, "reward_finetune.num_eval_prompts")
        train_prompts = [r["prompt"] for r in imported_prompts(cfg.data, "train")]
        print("[reward-finetune] note: the judge scores Shapes-world prompts only: on data.dir's prompts no "
              "reward-hacking watch and no GSB; the student's reward is recorded alone")
    else:
        data_dir = ensure_world(cfg.world, out / "data")
        eval_rows = head_rows(data_dir / "generator_test.parquet", "generator", rcfg.num_eval_prompts,
                              "reward_finetune.num_eval_prompts")
    prompts = [r["prompt"] for r in eval_rows]
    root.mkdir(parents=True, exist_ok=True)
    noise = torch.randn(task.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(cfg.seed))
    title = f"reward-finetune {generator} ({rcfg.finetune}): held-out prompts, same noise"

    def images_of(weights_dir: Path | None, num: int) -> torch.Tensor:
        """The first `num` prompts from their noise: the generator as given (LoRA adapters start at zero), or with
        trained weights."""
        model = task.build_model()
        if weights_dir is not None:
            task.load_pretrained(model, weights_dir)
        return task.sample(model, prompts[:num], noise[:num])

    kept: dict[int, list[Any]] = {}  # step -> the grid's images, for the first and the latest evaluation only

    def evaluate(at_step: int, weights_dir: Path | None) -> dict[str, Any]:
        images = images_of(weights_dir, len(prompts))
        mu_BD = task.student_scores(images, prompts).numpy()
        pil = to_pil(images)
        kept[at_step] = pil[:NUM_GRID]
        for old in [s for s in kept if s not in (0, at_step)]:
            del kept[old]
        if not watch:
            return student_record(at_step, mu_BD, task.dimensions, task.weights)
        return evaluation_record(at_step, pil, prompts, mu_BD, task.dimensions, task.weights)

    def report(records: list[dict[str, Any]], history: list[dict[str, float]]) -> dict[str, Any] | None:
        if not watch:
            r = records[-1]
            print(f"[reward-finetune] step {r['step']}: student reward {r['student_reward']:.3f} ("
                  + ", ".join(f"{d} {v:.3f}" for d, v in r["student"].items()) + "); no judge on data.dir's prompts")
            write_text_atomic(root / RECORDS_FILE, json.dumps(records, indent=1))
            save_reward_vs_judge(root / "reward_vs_judge.png", records, rcfg.gap_threshold, title, history)
            return None
        full = watched(records)
        r, g = full[-1], full[-1]["gsb_vs_start"]
        print(f"[reward-finetune] step {r['step']}: student reward {r['student_reward']:.3f}, alignment student "
              f"{r['student']['alignment']:.3f} / judge {r['judge']['alignment']:.3f}, gap {r['gap']:+.3f}; GSB vs "
              f"step 0 (judge) {g['good']:.0%}/{g['same']:.0%}/{g['bad']:.0%}, net {g['net']:+.3f}; judge decline "
              f"{r['decline']:+.3f}")
        write_text_atomic(root / RECORDS_FILE, json.dumps(full, indent=1))
        save_reward_vs_judge(root / "reward_vs_judge.png", records, rcfg.gap_threshold, title, history,
                             decline_threshold=rcfg.decline_threshold)
        tripped = alarm(records, rcfg.gap_threshold, rcfg.decline_threshold)
        if tripped is None:
            return None
        hacked, why = tripped
        print(f"[reward-finetune] WARNING: reward hacking at step {hacked['step']}: {why}; "
              + ("stopping" if rcfg.on_gap == "stop" else "going on (on_gap='warn')"))
        return {**hacked, "alarm": why}

    # Where the run stands: the latest checkpoint's step, and the evaluations up to it.
    latest = latest_checkpoint(run_dir) if resume else None
    step = int(read_learner_state(latest)["step"]) if latest is not None else 0
    history = read_learner_state(latest)["history"] if latest is not None else []
    records = [r for r in json.loads((root / RECORDS_FILE).read_text()) if r["step"] <= step] \
        if resume and (root / RECORDS_FILE).is_file() else []
    if not records and step > 0:  # the records file is gone: step 0 again, the reference of the gap and GSB
        records.append(evaluate(0, None))
    if not records or records[-1]["step"] != step:
        records.append(evaluate(step, latest / "hf" if latest is not None else None))
    hacked = report(records, history)
    init_ray(lcfg.num_workers * lcfg.cpus_per_worker + 1)
    if cfg.data.dir:
        import ray.data

        train = ray.data.from_items([{"prompt": p} for p in train_prompts])
    else:
        columns = ["prompt", "image_id", "image"] if rcfg.fm_weight > 0 else ["prompt"]
        train = read_ray_dataset(data_dir / "generator_train.parquet", "generator").select_columns(columns)
    print(f"[reward-finetune] {generator} generator {gen_dir} ({rcfg.finetune}); reward {rew_dir}; "
          f"{len(prompts)} held-out prompts; from step {step} to {lcfg.max_steps}")
    fitted = None
    while step < lcfg.max_steps and not (hacked is not None and rcfg.on_gap == "stop"):
        segment_end = min(step + rcfg.eval_every, lcfg.max_steps)
        fitted = fit(task, dataclasses.replace(lcfg, max_steps=segment_end), datasets={"train": train},
                     storage_path=root, name=RUN_NAME, resume=step > 0)
        step, history = fitted.final_step, fitted.history
        records.append(evaluate(step, fitted.hf_dir))
        hacked = report(records, history)

    hf_dir = fitted.hf_dir if fitted is not None else (latest / "hf" if latest is not None else None)
    if hf_dir is None:
        raise RuntimeError(f"nothing was trained: reward_finetune.learner.max_steps={lcfg.max_steps} and no checkpoint "
                           f"in {run_dir}")
    final_dir = export_final(hf_dir, run_dir)
    start = kept[0] if 0 in kept else to_pil(images_of(None, NUM_GRID))
    final = kept[step] if step in kept else to_pil(images_of(hf_dir, NUM_GRID))
    columns = grid_columns(generator, start, final, pipeline_dir=pipeline_dir, prompts=prompts[:NUM_GRID],
                           noise=noise[:NUM_GRID], base_steps=rcfg.base_steps, shift=rcfg.shift)
    verdicts = dict(zip(list(columns)[-2:], (judge_verdicts(records[0]), judge_verdicts(records[-1])))) \
        if watch else {}
    save_variant_grid(root / "grid.png", prompts, columns, NUM_GRID,  # labels of the evaluations, not judged again
                      verdicts={name: v for name, v in verdicts.items() if v is not None}, judged=watch)
    evaluations = watched(records) if watch else records
    record = {"generator": generator, "generator_dir": str(gen_dir), "pipeline_dir": str(pipeline_dir),
              "reward_dir": str(rew_dir), "final_dir": str(final_dir), "steps": step,
              "train_s": trained_seconds(history), "total_s": time.perf_counter() - started,
              "stopped_by_gap": hacked is not None and rcfg.on_gap == "stop" and step < lcfg.max_steps,
              "hacking": hacked, "gsb_vs_start": evaluations[-1]["gsb_vs_start"] if watch else None,
              "judge_watch": watch, "data_dir": cfg.data.dir, "grid": str(root / "grid.png"),
              "grid_columns": list(columns), "evaluations": evaluations, "history": history,
              "config": {"reward_finetune": to_dict(rcfg)}}
    write_text_atomic(root / "metrics.json", json.dumps(record, indent=2))
    write_text_atomic(root / "summary.md", summary_markdown(record, rcfg.gap_threshold))
    print(f"[reward-finetune] done at step {step} in {record['total_s'] / 60:.1f} min -> {final_dir}")
    return record


def grid_columns(generator: str, start: list[Any], final: list[Any], *, pipeline_dir: Path, prompts: list[str],
                 noise: torch.Tensor, base_steps: int, shift: float) -> dict[str, list[Any]]:
    """grid.png's columns, name -> PIL images of `prompts` from `noise`: for "turbo", the base pipeline sampled with
    `base_steps` (the teacher) and naively with 2 steps, then the student as given (`start`) and after the reward
    gradient (`final`); for "base", the generator as given and after."""
    if generator == "base":
        return {f"base {base_steps}-step": start, "base + reward grad": final}
    pipe = load_zimage(pipeline_dir)
    return {f"teacher {base_steps}-step": to_pil(sample_images(pipe, prompts, noise, base_steps, shift)),
            "naive 2-step": to_pil(sample_images(pipe, prompts, noise, 2, shift)),
            "Turbo++": start, "Turbo++ + reward grad": final}


def summary_markdown(record: dict[str, Any], threshold: float) -> str:
    """The run's evaluations as a table, the reward-hacking verdict and how to load the weights."""
    cfg = record["config"]["reward_finetune"]
    lines = [f"# reward-finetune: {record['generator']} generator ({cfg['finetune']})", "",
             f"Generator `{record['generator_dir']}`, student reward `{record['reward_dir']}`; {record['steps']} "
             f"steps ({record['train_s'] / 60:.1f} min of training). Weights: `{record['final_dir']}`.", ""]
    if not record.get("judge_watch", True):
        return "\n".join(lines + _student_only_lines(record)) + "\n"
    lines += ["| step | student reward R | student alignment | judge alignment | gap | judge main colour "
             "| GSB vs step 0 (G / S / B) | net | judge decline |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["evaluations"]:
        g = r["gsb_vs_start"]
        lines.append(f"| {r['step']} | {r['student_reward']:.3f} | {r['student']['alignment']:.3f} | "
                     f"{r['judge']['alignment']:.3f} | {r['gap']:+.3f} | {r['judge']['main_colour']:.1%} | "
                     f"{g['good']:.0%} / {g['same']:.0%} / {g['bad']:.0%} | {g['net']:+.3f} | "
                     + (f"{r['decline']:+.3f} |" if "decline" in r else "- |"))
    hacked, g = record["hacking"], record["gsb_vs_start"]
    lines += ["", "Gap = (student alignment - judge alignment) - the same at step 0; threshold "
              f"{threshold:g}. Judge decline = the larger of -net GSB vs step 0 and the fall of the judge's "
              f"main-colour rate since step 0; threshold {cfg.get('decline_threshold', 0):g} (0 = off). "
              f"on_gap={cfg['on_gap']!r}. GSB vs step 0: per held-out prompt (same noise), the "
              "judge's true alignment above (Good), equal to (Same) or below (Bad) the generator as given; "
              "net = G - B (`zray.evaluation.turbo.gsb`)."]
    why = hacked.get("alarm", f"the gap reached {hacked['gap']:+.3f}") if hacked else ""
    lines.append(f"Reward hacking at step {hacked['step']}: {why}"
                 + ("; the run stopped there." if record["stopped_by_gap"] else ".") if hacked else
                 "No reward hacking detected: the gap and the judge's decline stayed within their thresholds.")
    failed = ["net GSB <= 0"] * (g["net"] <= 0) + ["reward hacking"] * (hacked is not None)
    lines.append("")
    lines.append(f"Final (step {record['steps']}) against step 0: good {g['good']:.1%}, same {g['same']:.1%}, bad "
                 f"{g['bad']:.1%}, net {g['net']:+.3f}: "
                 + (f"not shown that the reward gradient raised the true alignment ({'; '.join(failed)})." if failed
                    else "the reward gradient raised the true alignment with no widening gap."))
    lines += ["", f"Grid (`grid.png`, first {NUM_GRID} held-out prompts, same noise, judge's alignment on each "
              f"image): {' | '.join(record['grid_columns'])}."]
    lines += ["", f"Loading: {LOADING[(record['generator'], cfg['finetune'])]}.", ""]
    return "\n".join(lines)


def _student_only_lines(record: dict[str, Any]) -> list[str]:
    """summary.md on an import's prompts: the student's reward per evaluation, why there is no judge, the grid."""
    dims = list(record["evaluations"][0]["student"])
    lines = ["| step | student reward R | " + " | ".join(f"student {d}" for d in dims) + " |",
             "|---:|---:|" + "---:|" * len(dims)]
    for r in record["evaluations"]:
        lines.append(f"| {r['step']} | {r['student_reward']:.3f} | "
                     + " | ".join(f"{r['student'][d]:.3f}" for d in dims) + " |")
    first, last = record["evaluations"][0], record["evaluations"][-1]
    cfg = record["config"]["reward_finetune"]
    return lines + ["", f"Prompts: data.dir `{record['data_dir']}` (train split trained on, test split held out). "
                    "The judge scores Shapes-world prompts only, so there is no reward-hacking watch (on_gap="
                    f"{cfg['on_gap']!r}), no judge alignment and no GSB: the student's reward went from "
                    f"{first['student_reward']:.3f} (step 0) to {last['student_reward']:.3f} (step {last['step']}), "
                    "which says nothing about hacking on its own.", "",
                    f"Grid (`grid.png`, first {NUM_GRID} held-out prompts, same noise, no judge labels): "
                    f"{' | '.join(record['grid_columns'])}.", "",
                    f"Loading: {LOADING[(record['generator'], cfg['finetune'])]}."]


LOADING = {("base", "lora"): "`ZImagePipeline.from_pretrained(base).load_lora_weights(final_dir)`",
           ("turbo", "lora"): "`lora_step1.safetensors` / `lora_step2.safetensors` onto the transformer of that step "
                              "(`load_lora_weights(final_dir, weight_name=...)`)",
           ("base", "full"): "`ZImageTransformer2DModel.from_pretrained(final_dir)` in place of the pipeline's",
           ("turbo", "full"): "`zray.models.turbo.TwoStepStudent.from_pretrained(final_dir)`"}
