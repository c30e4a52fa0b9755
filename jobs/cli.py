"""The `zray` command line.

    zray run    [--recipe NAME] [--set key=value ...] [--stages S,...] [--fresh]
                                                        the whole system, stage by stage, into one run dir with a
                                                        report (finished stages with the same config are skipped)
    zray demo   [--recipe NAME] [--set key=value ...]   build data + tiny zoo, load every model, write a grid
    zray data   [--recipe NAME] [--set key=value ...]   build the Shapes world as Parquet
    zray data import SOURCE --out DIR --kind rated|pairs|scoring|prompts [--format auto|jsonl|csv|folder|parquet]
                [--map SRC=DST ...] [--rubric FILE] [--on-bad-row reject|skip]
                                                        bring your own data (docs/data-formats.md)
    zray config [--recipe NAME] [--set key=value ...]   print the resolved config as JSON
    zray evaluate --model DIR [--form auto|reasoning|direct] [--name NAME] [--recipe NAME] [--set ...]
                                                        HPA, Margin HPA, PLCC, SRCC of a reward model
    zray evaluate --curve RUN [RUN ...] [--model BASE] [--name NAME] [--recipe NAME] [--set ...]
                                                        HPA against training pairs seen, every checkpoint of
                                                        each run (--model: the point at 0 pairs), plotted
                                                        (train-teacher, evaluate, train-student: --set
                                                        data.dir=IMPORT for your own data, README "Your own data")
    zray train-teacher --method gdso|grpo|sft|zero_shot|all [--resume] [--recipe NAME] [--set ...]
                                                        Z-Reward teacher (GDSO or a baseline), then evaluate
    zray train-student --method risd|opd|sft|all [--resume] [--recipe NAME] [--set ...]
                                                        Z-Reward student (RISD, OPD or SFT), beside its teacher
    zray reward-finetune [--generator base|turbo] [--generator-dir DIR] [--reward-dir DIR] [--resume] [--recipe ...]
                                                        reward-gradient fine-tuning, judged for reward hacking
    zray serve [--model DIR] [--host H] [--port N] [--detach] [--recipe NAME] [--set serve.key=value ...]
                                                        the reward service (Ray Serve) over a student checkpoint

Bad input (unknown recipe, unknown key, wrong type) exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.recipes import RECIPES, get_recipe
from zray.config import TURBO_VARIANTS, ConfigError, RunConfig, apply_overrides, parse_set_args, to_dict


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"zray: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _config_args() -> argparse.ArgumentParser:
    parent = _Parser(add_help=False)
    parent.add_argument("--recipe", default="tiny_cpu", help=f"named run: {', '.join(RECIPES)} (default tiny_cpu)")
    parent.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set world.seed=3 (repeatable)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zray", description="Distributed RL post-training for text-to-image (Z-Reward, Turbo++)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parent = _config_args()
    sub.add_parser("config", parents=[parent], help="print the resolved config as JSON")
    data = sub.add_parser("data", parents=[parent], help="build the Shapes world (Parquet + manifest)")
    data.add_argument("--out", default=None, help="output folder (default <out_dir>/data)")
    data_sub = data.add_subparsers(dest="data_command", required=False, parser_class=_Parser, metavar="import")
    imp = data_sub.add_parser("import", help="import your own data (docs/data-formats.md)")
    imp.add_argument("source", help="a .jsonl, .csv or .parquet file, or a folder of images with a sidecar file")
    imp.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    imp.add_argument("--kind", required=True, choices=("rated", "pairs", "scoring", "prompts"),
                     help="rated images (+ derived pairs), preference pairs, scoring inputs, or prompts")
    imp.add_argument("--format", dest="fmt", choices=("auto", "jsonl", "csv", "folder", "parquet"), default="auto",
                     help="source format (default auto: by suffix; a folder is folder)")
    imp.add_argument("--map", dest="maps", action="append", default=[], metavar="SRC=DST",
                     help="rename a source column to a field, e.g. --map text=prompt,file=image (repeatable)")
    imp.add_argument("--rubric", default=None, help="rubric file (.json/.yaml): dimensions and five anchors each "
                     "(default: the four built-in dimensions)")
    imp.add_argument("--on-bad-row", choices=("reject", "skip"), default="reject",
                     help="reject: write nothing and exit 1 (default); skip: drop bad rows, count and report them")
    run = sub.add_parser("run", parents=[parent], help="the whole pipeline: data, base models, teacher, student, "
                         "reward service, Turbo++, reward gradient, report (resumable)")
    run.add_argument("--stages", default=None, metavar="S,...",
                     help="run only these stages (and check their inputs exist); default: every stage in order")
    run.add_argument("--fresh", action="store_true", help="set aside every earlier stage output of this run dir "
                     "(moved to <out_dir>/superseded/) and start over")
    demo = sub.add_parser("demo", parents=[parent], help="data + tiny model zoo + load through every stack")
    demo.add_argument("--skip-vllm", action="store_true", help="do not start a vLLM engine (it is started by default)")
    vlm = sub.add_parser("pretrain-vlm", parents=[parent], help="pre-train the tiny teacher/student VLM (captioning)")
    vlm.add_argument("--model", choices=("teacher", "student", "both"), default="both", help="which VLM(s) to train")
    vlm.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    gen = sub.add_parser("pretrain-generator", parents=[parent],
                         help="pre-train the tiny Z-Image generator (VAE, then flow transformer)")
    gen.add_argument("--resume", action="store_true", help="keep finished phases, continue a cut one from its "
                     "latest checkpoint")
    ev = sub.add_parser("evaluate", parents=[parent], help="HPA, Margin HPA, PLCC, SRCC of a reward model on the "
                        "Shapes test pairs")
    ev.add_argument("--model", default=None, help="Hugging Face format Qwen-VL dir (a checkpoint's hf/ dir); with "
                    "--curve, the base model: the point at 0 pairs")
    ev.add_argument("--curve", nargs="+", default=None, metavar="RUN",
                    help="HPA against training pairs seen: evaluate every checkpoint of each training run's folder "
                    "(e.g. <out_dir>/train_teacher/gdso) in turn, then plot them (<out_dir>/evaluate/NAME)")
    ev.add_argument("--form", choices=("auto", "reasoning", "direct"), default="auto",
                    help="reasoning (teacher) or direct (student); auto: <model>/zray_scoring.json, else reasoning")
    ev.add_argument("--name", default=None, help="output folder <out_dir>/evaluate/NAME (default: from the model)")
    tt = sub.add_parser("train-teacher", parents=[parent], help="train the Z-Reward teacher with GDSO or a baseline, "
                        "then evaluate it")
    tt.add_argument("--method", choices=("gdso", "grpo", "sft", "zero_shot", "all"), default=None,
                    help="default: train_teacher.method of the recipe; all: the four methods, then the table")
    tt.add_argument("--resume", action="store_true", help="continue each method from its latest checkpoint")
    ts = sub.add_parser("train-student", parents=[parent], help="train the Z-Reward student (RISD from the teacher, "
                        "or SFT), then evaluate it beside its teacher")
    ts.add_argument("--method", choices=("risd", "opd", "sft", "all"), default=None,
                    help="default: train_student.method of the recipe; all: SFT, OPD and RISD, then the table")
    ts.add_argument("--resume", action="store_true", help="continue each method from its latest checkpoint")
    dg = sub.add_parser("distill-generator", parents=[parent], help="Turbo++: distil the 8-step generator into a "
                        "two-step student (and its ablations), then judge them")
    dg.add_argument("--variant", choices=(*TURBO_VARIANTS, "all"), default=None,
                    help="default: distill_generator.variants of the recipe; all: Turbo++ and the four ablations")
    dg.add_argument("--resume", action="store_true", help="keep finished variants, continue a cut one from its "
                    "latest checkpoint")
    rf = sub.add_parser("reward-finetune", parents=[parent], help="reward-gradient fine-tuning of a generator on the "
                        "differentiable student reward, watched by the judge for reward hacking")
    rf.add_argument("--generator", choices=("base", "turbo"), default="base",
                    help="base: the N-step generator of pretrain-generator; turbo: the Turbo++ student")
    rf.add_argument("--generator-dir", default=None, help="the generator (base: a ZImagePipeline folder; turbo: a "
                    "TwoStepStudent folder); default: reward_finetune.generator_dir, else this run's")
    rf.add_argument("--reward-dir", default=None, help="the student reward (one-token form); default: "
                    "reward_finetune.reward_dir, else <out_dir>/train_student/risd/final")
    rf.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    sv = sub.add_parser("serve", parents=[parent], help="serve a student checkpoint as the reward service (Ray Serve)")
    sv.add_argument("--model", default=None, help="student checkpoint dir (default: serve.model, else "
                    "<out_dir>/train_student/risd/final)")
    sv.add_argument("--host", default=None, help="HTTP host (default: serve.host)")
    sv.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port)")
    sv.add_argument("--detach", action="store_true", help="return once deployed instead of blocking until Ctrl-C "
                    "(the service outlives this process only on a cluster, RAY_ADDRESS)")
    return parser


def resolve_config(recipe: str, overrides: list[str]) -> RunConfig:
    return apply_overrides(get_recipe(recipe), parse_set_args(overrides))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"zray: error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    if args.command == "data" and args.data_command == "import":
        from jobs.data_import import run_data_import

        return run_data_import(args.source, args.out, kind=args.kind, fmt=args.fmt, maps=args.maps,
                               rubric=args.rubric, on_bad_row=args.on_bad_row)
    if args.command == "data":
        from jobs.build_data import run_build_data

        run_build_data(cfg, out=args.out)
        return 0
    if args.command == "run":
        from jobs.run import run_pipeline
        from zray.data.parquet import DataError

        try:
            run_pipeline(cfg, stages=args.stages, fresh=args.fresh)
        except (ConfigError, FileNotFoundError, FileExistsError, DataError) as err:
            print(f"zray: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from jobs.demo import run_demo

        run_demo(cfg, use_vllm=not args.skip_vllm)
        return 0
    if args.command == "pretrain-vlm":
        from jobs.pretrain_vlm import run_pretrain_vlm

        run_pretrain_vlm(cfg, model=args.model, resume=args.resume)
        return 0
    if args.command == "pretrain-generator":
        from jobs.pretrain_generator import run_pretrain_generator

        run_pretrain_generator(cfg, resume=args.resume)
        return 0
    if args.command == "evaluate":
        from jobs.evaluate import run_curve, run_evaluate
        from zray.data.parquet import DataError

        if args.model is None and not args.curve:
            print("zray: error: evaluate needs --model DIR (a model) or --curve RUN [RUN ...] (training runs)",
                  file=sys.stderr)
            return 2
        try:
            if args.curve:
                run_curve(cfg, args.curve, base=args.model, name=args.name or "curve")
            else:
                run_evaluate(cfg, args.model, form=args.form, name=args.name)
        except (ConfigError, FileNotFoundError, DataError) as err:  # DataError: a bad table in data.dir
            print(f"zray: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "train-teacher":
        from jobs.train_teacher import run_train_teacher
        from zray.data.parquet import DataError

        try:
            run_train_teacher(cfg, method=args.method, resume=args.resume)
        except (ConfigError, FileExistsError, DataError) as err:  # FileExistsError: a finished run and no --resume
            print(f"zray: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "train-student":
        from jobs.train_student import run_train_student
        from zray.data.parquet import DataError

        try:
            run_train_student(cfg, method=args.method, resume=args.resume)
        except (ConfigError, FileExistsError, DataError) as err:  # DataError: a bad table in data.dir
            print(f"zray: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "distill-generator":
        from jobs.distill_generator import run_distill_generator
        from zray.config import TURBO_VARIANTS

        variants = TURBO_VARIANTS if args.variant == "all" else (args.variant,) if args.variant else None
        try:
            run_distill_generator(cfg, resume=args.resume, variants=variants)
        except (ConfigError, FileNotFoundError) as err:  # FileNotFoundError: no teacher pipeline yet
            print(f"zray: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "reward-finetune":
        from jobs.reward_finetune import run_reward_finetune

        try:
            run_reward_finetune(cfg, args.generator, generator_dir=args.generator_dir, reward_dir=args.reward_dir,
                                resume=args.resume)
        except (ConfigError, FileExistsError) as err:  # FileExistsError: an earlier run and no --resume
            print(f"zray: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "serve":
        from jobs.serve import run_serve

        try:
            run_serve(cfg, model=args.model, host=args.host, port=args.port, detach=args.detach)
        except (ConfigError, FileNotFoundError) as err:
            print(f"zray: error: {err}", file=sys.stderr)
            return 2
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
