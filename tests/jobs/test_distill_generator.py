"""`zray distill-generator` on the tiny_cpu recipe: teacher samples in Parquet, the recipe's variant through Ray Train,
the references and the table (the README run's stage: the `readme_pipeline` fixture), resume, the variants and the
errors a user meets first."""

import dataclasses
import json

import pytest

from jobs.cli import main
from jobs.recipes import tiny_cpu
from zray.config import TURBO_VARIANTS, ConfigError, turbo_variant
from zray.evaluation.turbo_trajectory import TRAJECTORY_KEYS


def _cfg(out_dir, teacher=""):
    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(out_dir))
    # two held-out prompts: the judge is slow on the noise an untrained generator draws
    return dataclasses.replace(cfg, distill_generator=dataclasses.replace(cfg.distill_generator,
                                                                          teacher_dir=str(teacher), num_eval_prompts=2))


def test_missing_teacher_names_the_field_and_the_job_that_makes_it(tmp_path, capsys):
    from jobs.distill_generator import run_distill_generator

    with pytest.raises(FileNotFoundError, match=r"distill_generator.teacher_dir.*zray pretrain-generator"):
        run_distill_generator(_cfg(tmp_path))
    assert main(["distill-generator", "--set", f"out_dir={tmp_path}"]) == 2
    assert "zray pretrain-generator" in capsys.readouterr().err


def test_variants_and_their_errors():
    turbo = tiny_cpu().distill_generator.turbo
    assert turbo_variant(turbo, "turbo") == turbo
    assert turbo_variant(turbo, "shared").decoupling == "shared"
    assert turbo_variant(turbo, "detached").detach_steps
    assert turbo_variant(turbo, "renders").real_data == "renders"
    assert turbo_variant(turbo, "no_step1").step1_loss == "none"
    with pytest.raises(ValueError, match="variant='gan' is not allowed"):
        turbo_variant(turbo, "gan")
    with pytest.raises(ConfigError, match=r"DistillGeneratorConfig.variants"):
        dataclasses.replace(tiny_cpu().distill_generator, variants=("turbo", "turbo"))
    with pytest.raises(ConfigError, match=r"DistillGeneratorConfig.seeds=0 is not allowed: expected an integer > 0"):
        dataclasses.replace(tiny_cpu().distill_generator, seeds=0)
    assert set(TURBO_VARIANTS) == {"turbo", "shared", "detached", "renders", "no_step1"}


def test_the_pipeline_run_end_to_end_and_resume(readme_pipeline, tmp_path, ray_session, capsys, monkeypatch):
    """The README run's Turbo++ stage (the recipe's variant, trained through Ray Train), then `--resume` on a copy
    with a second training seed: the finished variant, the collected teacher samples and the judged references are
    kept as they are (same student, same figures), the second seed's run is asked for with the next learner seed,
    exported and judged, and results.md adds the summary over seeds."""
    import shutil

    from jobs.distill_generator import run_distill_generator

    run = readme_pipeline["run_dir"]
    root = run / "distill_generator"
    (variant,) = tiny_cpu().distill_generator.variants
    for name in ("metrics.json", "results.md", "samples.png", "references.json", "references.parquet",
                 "teacher_samples/manifest.json",
                 f"{variant}/final/turbo_student.json", f"{variant}/pipeline/README.md",
                 f"{variant}/pipeline/transformer_2/config.json"):
        assert (root / name).is_file(), name
    assert list((root / variant / "tensorboard").glob("events.out.tfevents.*"))
    record = json.loads((root / "metrics.json").read_text())
    rows = record["rows"]
    assert set(rows) == {"teacher 8-step", "naive 2-step", variant}
    m, dcfg = rows[variant], tiny_cpu().distill_generator
    assert m["train_steps"] == dcfg.learner.max_steps and m["num"] == dcfg.num_eval_prompts
    assert -1.0 <= m["gsb_vs_teacher_net"] <= 1.0 and m["frechet_to_renders"] >= 0.0
    table = (root / "results.md").read_text()
    assert f"| {variant} | 2 |" in table and "| teacher 8-step | 8 |" in table
    ci = record["frechet_intervals"][variant]  # the paired bootstrap over the prompts
    assert ci["gap_closed_lo"] <= ci["gap_closed_hi"] and "95% intervals, paired bootstrap" in table
    traj = record["trajectory"]  # each two-step sampler's distance to the teacher's trajectory, step by step
    assert set(traj) == {"naive 2-step", variant}
    assert all(set(t) == set(TRAJECTORY_KEYS) and all(0.0 < v < float("inf") for v in t.values())
               for t in traj.values())
    assert "## Teacher alignment of the two steps" in table
    assert f"| {variant} | {traj[variant]['mid_mse_to_teacher']:.5f} |" in table

    copy = tmp_path / "run"
    for part in ("data", "distill_generator"):
        shutil.copytree(run / part, copy / part)
    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(copy))  # the same teacher: the samples' manifest names it
    cfg = dataclasses.replace(cfg, distill_generator=dataclasses.replace(
        cfg.distill_generator, teacher_dir=str(run / "pretrain_generator" / "pipeline")))
    cfg = dataclasses.replace(cfg, distill_generator=dataclasses.replace(cfg.distill_generator, seeds=2))
    # A second training seed of the variant. Its fit (Ray Train, tested above and in every job) is stood in for by
    # a copy of the first seed's finished run, so that its row must equal the first's; the stand-in records what
    # the job asked for.
    import actors.learner

    asked, real_fit_phase = [], actors.learner.fit_phase

    def fit_phase(task, learner, dataset, root, name, resume, budget_s, tag):
        asked.append((name, learner.seed, resume))
        if not (root / name).exists():
            shutil.copytree(root / variant, root / name, ignore=shutil.ignore_patterns("pipeline"))
        return real_fit_phase(task, learner, dataset, root, name, resume, budget_s, tag)

    monkeypatch.setattr(actors.learner, "fit_phase", fit_phase)
    capsys.readouterr()
    again = run_distill_generator(cfg, resume=True)
    seed = dcfg.learner.seed
    assert asked == [(variant, seed, True), (f"{variant}_seed1", seed + 1, True)]  # every variant of seed 0 first
    second = again["rows"].pop(f"{variant}_seed1")
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(rows, sort_keys=True)  # kept (nan-safe)
    assert "references kept from" in capsys.readouterr().out  # not sampled and judged again
    assert (copy / "distill_generator" / f"{variant}_seed1" / "pipeline" / "README.md").is_file()  # exported
    same = [json.dumps({k: v for k, v in r.items() if k != "train_s"}, sort_keys=True) for r in (second, rows[variant])]
    assert same[0] == same[1]  # the same student from the same noise: the same figures (nan-safe)
    assert again["trajectory"][f"{variant}_seed1"] == again["trajectory"][variant] == traj[variant]
    summary = again["seed_summary"][variant]
    assert again["seeds"] == 2 and summary["frechet_to_renders"]["n"] == 2 and summary["frechet_to_renders"]["se"] == 0
    assert summary["x0_mse_to_teacher"]["n"] == 2 and summary["x0_mse_to_teacher"]["se"] == 0  # from the trajectory
    table = (copy / "distill_generator" / "results.md").read_text()
    assert f"| {variant}_seed1 | 2 |" in table  # its row (2 sampling steps)
    assert f"| {variant} | 2 | " in table.split("## Over training seeds")[1]  # the mean over its 2 seeds
