"""Recipes build, overrides are type-checked, bad CLI input gives one line and exit status 2."""

import subprocess
import sys

import pytest

from jobs.cli import main, resolve_config
from jobs.recipes import RECIPES
from zray.config import ConfigError, RunConfig, WorldConfig


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_a_valid_config(name):
    cfg = RECIPES[name]()
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name


def test_full_recipe_names_real_checkpoints():
    cfg = RECIPES["full"]()
    assert cfg.teacher.checkpoint.startswith("Qwen/") and "VL" in cfg.teacher.checkpoint
    assert cfg.student.checkpoint.startswith("Qwen/") and "VL" in cfg.student.checkpoint
    assert cfg.generator.checkpoint == "Tongyi-MAI/Z-Image-Turbo"


def test_overrides_are_typed_and_nested():
    cfg = resolve_config("tiny_cpu", ["world.seed=7", "vllm.enforce_eager=false", "generator.vae_block_channels=8,16"])
    assert cfg.world.seed == 7 and cfg.vllm.enforce_eager is False
    assert cfg.generator.vae_block_channels == (8, 16)
    assert cfg.teacher == RECIPES["tiny_cpu"]().teacher  # untouched subtrees are kept


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["world.sed=1"], "unknown config key 'world.sed' (did you mean 'world.seed'?)"),
        (["world.seed=abc"], "world.seed='abc' is not allowed: expected int"),
        (["teacher.arch=llama"], "teacher.arch='llama' is not allowed"),
        (["world.image_size=50"], "WorldConfig.image_size=50 is not allowed"),
        (["teacher.head_dim=48"], "VLMConfig.head_dim=48 is not allowed"),
        (["noequals"], "expected key=value"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny_cpu", overrides)
    assert fragment in str(info.value)


def test_config_validation_on_construction():
    with pytest.raises(ConfigError, match="num_annotators"):
        WorldConfig(num_annotators=2)


def test_main_prints_json(capsys):
    assert main(["config", "--set", "world.seed=5"]) == 0
    assert '"seed": 5' in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["config", "--recipe", "nope"], "--recipe 'nope' is not allowed: expected one of tiny_cpu, dev, full"),
        (["config", "--set", "world.bogus=1"], "unknown config key 'world.bogus'"),
        (["config", "--set", "world.num_train_prompts=1.5"], "expected int"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_console_script_bad_input_is_one_line(argv, fragment):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert fragment in lines[0]
