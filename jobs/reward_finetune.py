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
(student alignment minus judge alignment, relative to step 0) exceeds `gap_threshold`, the run stops
(`on_gap="stop"`, the default) or prints a warning and goes on (`"warn"`).

Outputs under `<out_dir>/reward_finetune/<generator>/`: `train/` (the Ray Train run: checkpoints, `tensorboard/`,
`final/`: the fine-tuned weights, layout in `zray/models/reward_generator.py`: LoRA in diffusers' pipeline LoRA
format, or the full network), `reward_vs_judge.json` and `.png` (every evaluation), `metrics.json`, `summary.md`.
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
from zray.evaluation.reward_hacking import evaluation_record, save_reward_vs_judge, widened, with_gaps
from zray.models.generator import to_pil
from zray.training.runs import export_final, has_checkpoint, latest_checkpoint, read_learner_state, trained_seconds

GENERATORS = ("base", "turbo")
RUN_NAME = "train"
RECORDS_FILE = "reward_vs_judge.json"


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
    scoring = found[2] / "zray_scoring.json"
    if scoring.is_file() and json.loads(scoring.read_text()).get("form") != "direct":
        raise ConfigError(f"reward_finetune.reward_dir={str(found[2])!r} is not allowed: {scoring} says form "
                          f"{json.loads(scoring.read_text()).get('form')!r}; the differentiable reward scores in one "
                          "token: expected a direct-form student (RISD or SFT)")
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
    out = Path(cfg.out_dir).resolve()
    root = out / "reward_finetune" / generator
    run_dir = root / RUN_NAME
    gen_dir, pipeline_dir, rew_dir = input_dirs(cfg, generator, generator_dir, reward_dir)
    if not resume and has_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir} holds checkpoints of an earlier run: pass --resume to continue it, or "
                              "remove it")
    started = time.perf_counter()
    data_dir = ensure_world(cfg.world, out / "data")
    prompts = [r["prompt"] for r in head_rows(data_dir / "generator_test.parquet", "generator",
                                              rcfg.num_eval_prompts, "reward_finetune.num_eval_prompts")]
    root.mkdir(parents=True, exist_ok=True)
    task = RewardGradTask(rcfg, kind=generator, generator_dir=gen_dir, pipeline_dir=pipeline_dir, reward_dir=rew_dir,
                          image_size=cfg.world.image_size)
    noise = torch.randn(task.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(cfg.seed))
    title = f"reward-finetune {generator} ({rcfg.finetune}): held-out prompts, same noise"

    def evaluate(at_step: int, weights_dir: Path | None) -> dict[str, Any]:
        model = task.build_model()  # the generator as given (LoRA adapters start at zero), or trained weights
        if weights_dir is not None:
            task.load_pretrained(model, weights_dir)
        images = task.sample(model, prompts, noise)
        mu_BD = task.student_scores(images, prompts).numpy()
        return evaluation_record(at_step, to_pil(images), prompts, mu_BD, task.dimensions, task.weights)

    def report(records: list[dict[str, Any]], history: list[dict[str, float]]) -> dict[str, Any] | None:
        r = with_gaps(records)[-1]
        print(f"[reward-finetune] step {r['step']}: student reward {r['student_reward']:.3f}, alignment student "
              f"{r['student']['alignment']:.3f} / judge {r['judge']['alignment']:.3f}, gap {r['gap']:+.3f}")
        (root / RECORDS_FILE).write_text(json.dumps(with_gaps(records), indent=1))
        save_reward_vs_judge(root / "reward_vs_judge.png", records, rcfg.gap_threshold, title, history)
        hacked = widened(records, rcfg.gap_threshold)
        if hacked is not None:
            print(f"[reward-finetune] WARNING: reward hacking: the gap reached {hacked['gap']:+.3f} at step "
                  f"{hacked['step']} (threshold {rcfg.gap_threshold}); "
                  + ("stopping" if rcfg.on_gap == "stop" else "going on (on_gap='warn')"))
        return hacked

    # Where the run stands: the latest checkpoint's step, and the evaluations up to it.
    latest = latest_checkpoint(run_dir) if resume else None
    step = int(read_learner_state(latest)["step"]) if latest is not None else 0
    history = read_learner_state(latest)["history"] if latest is not None else []
    records = [r for r in json.loads((root / RECORDS_FILE).read_text()) if r["step"] <= step] \
        if resume and (root / RECORDS_FILE).is_file() else []
    if not records or records[-1]["step"] != step:
        records.append(evaluate(step, latest / "hf" if latest is not None else None))
    hacked = report(records, history)
    init_ray(lcfg.num_workers * lcfg.cpus_per_worker + 1)
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
    record = {"generator": generator, "generator_dir": str(gen_dir), "pipeline_dir": str(pipeline_dir),
              "reward_dir": str(rew_dir), "final_dir": str(final_dir), "steps": step,
              "train_s": trained_seconds(history), "total_s": time.perf_counter() - started,
              "stopped_by_gap": hacked is not None and rcfg.on_gap == "stop" and step < lcfg.max_steps,
              "hacking": hacked, "evaluations": with_gaps(records), "history": history,
              "config": {"reward_finetune": to_dict(rcfg)}}
    (root / "metrics.json").write_text(json.dumps(record, indent=2))
    (root / "summary.md").write_text(summary_markdown(record, rcfg.gap_threshold))
    print(f"[reward-finetune] done at step {step} in {record['total_s'] / 60:.1f} min -> {final_dir}")
    return record


def summary_markdown(record: dict[str, Any], threshold: float) -> str:
    """The run's evaluations as a table, the reward-hacking verdict and how to load the weights."""
    cfg = record["config"]["reward_finetune"]
    lines = [f"# reward-finetune: {record['generator']} generator ({cfg['finetune']})", "",
             f"Generator `{record['generator_dir']}`, student reward `{record['reward_dir']}`; {record['steps']} "
             f"steps ({record['train_s'] / 60:.1f} min of training). Weights: `{record['final_dir']}`.", "",
             "| step | student reward R | student alignment | judge alignment | gap | judge main colour |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in record["evaluations"]:
        lines.append(f"| {r['step']} | {r['student_reward']:.3f} | {r['student']['alignment']:.3f} | "
                     f"{r['judge']['alignment']:.3f} | {r['gap']:+.3f} | {r['judge']['main_colour']:.1%} |")
    hacked = record["hacking"]
    lines += ["", "Gap = (student alignment - judge alignment) - the same at step 0; threshold "
              f"{threshold:g} (on_gap={cfg['on_gap']!r})."]
    lines.append(f"Reward hacking: the gap reached {hacked['gap']:+.3f} at step {hacked['step']}"
                 + ("; the run stopped there." if record["stopped_by_gap"] else ".") if hacked else
                 "No reward hacking detected: the gap stayed within the threshold.")
    load = {("base", "lora"): "`ZImagePipeline.from_pretrained(base).load_lora_weights(final_dir)`",
            ("turbo", "lora"): "`lora_step1.safetensors` / `lora_step2.safetensors` onto the transformer of that step "
                               "(`load_lora_weights(final_dir, weight_name=...)`)",
            ("base", "full"): "`ZImageTransformer2DModel.from_pretrained(final_dir)` in place of the pipeline's",
            ("turbo", "full"): "`zray.models.turbo.TwoStepStudent.from_pretrained(final_dir)`"}
    lines += ["", f"Loading: {load[(record['generator'], cfg['finetune'])]}.", ""]
    return "\n".join(lines)
