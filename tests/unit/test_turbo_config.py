"""zray.config.TurboConfig: the Turbo++ knobs (methods.md §6), their defaults and validation."""

import pytest

from zray.config import ConfigError, TurboConfig, apply_overrides
from zray.sampling import flow_sigmas


def test_defaults_are_the_spec_choices():
    cfg = TurboConfig()
    assert (cfg.sigma_2, cfg.teacher_steps, cfg.teacher_shift, cfg.teacher_mid_steps) == (0.75, 8, 3.0, 4)
    assert flow_sigmas(cfg.teacher_steps, cfg.teacher_shift)[cfg.teacher_mid_steps].item() == cfg.sigma_2
    assert cfg.decoupling == "copies" and not cfg.detach_steps and cfg.renoise == "same"
    assert cfg.step1_loss == "regression" and cfg.real_data == "teacher"


def test_sigma_2_must_be_the_teachers_state_for_the_regression_target():
    with pytest.raises(ConfigError, match=r"TurboConfig.sigma_2=0.7 is not allowed: expected 0.7500"):
        TurboConfig(sigma_2=0.7)
    cfg = TurboConfig(sigma_2=0.5, teacher_mid_steps=6)  # flow_sigmas(8, 3)[6] = 0.5
    assert flow_sigmas(8, 3.0)[6].item() == pytest.approx(cfg.sigma_2)
    TurboConfig(sigma_2=0.7, step1_loss="adversarial")  # no teacher intermediate needed


@pytest.mark.parametrize("field, value, expected", [
    ("decoupling", "split", "one of"), ("step1_loss", "l2", "one of"), ("real_data", "web", "one of"),
    ("renoise", "new", "one of"), ("disc_head", "mlp", "one of"), ("lam_adv", -1.0, "a float >= 0"),
    ("lam_1_decay_steps", -5, "an integer >= 0"), ("disc_lr", 0.0, "a float > 0"), ("lora_rank", 0, "an integer > 0"),
    ("disc_blocks", (), "non-empty"), ("disc_blocks", (1, 1), "distinct"), ("disc_tau_range", (0.5,), "(lo, hi)"),
    ("disc_tau_range", (0.9, 0.1), "(lo, hi)"), ("teacher_mid_steps", 8, r"\[1, teacher_steps=8\)"),
    ("sigma_2", 1.0, r"\(0, 1\)"), ("disc_steps_per_gen_step", 0, "an integer > 0"),
    ("lora_rank", True, "an integer > 0"),  # a bool is an int in Python, not a count
])
def test_errors_name_field_value_and_allowed(field, value, expected):
    with pytest.raises(ConfigError, match=rf"TurboConfig.{field}={value!r}".replace("(", r"\(").replace(")", r"\)")
                       + rf" is not allowed: expected .*{expected}"):
        TurboConfig(**{field: value})


def test_set_overrides_parse_every_knob_kind():
    cfg = apply_overrides(TurboConfig(), {"disc_blocks": "0,-2", "disc_tau_range": "0.2,0.8", "decoupling": "lora",
                                          "detach_steps": "true", "lam_1": "0.5"})
    assert cfg.disc_blocks == (0, -2) and cfg.disc_tau_range == (0.2, 0.8) and cfg.decoupling == "lora"
    assert cfg.detach_steps is True and cfg.lam_1 == 0.5
    with pytest.raises(ConfigError, match="decoupling='split'"):
        apply_overrides(TurboConfig(), {"decoupling": "split"})


@pytest.mark.parametrize("steps, mid, shift", [(8, 4, 3.0), (8, 6, 3.0), (4, 1, 1.0), (10, 3, 5.0)])
def test_teacher_mid_sigma_is_the_samplers_sigma_after_mid_steps(steps, mid, shift):
    cfg = TurboConfig(teacher_steps=steps, teacher_mid_steps=mid, teacher_shift=shift, step1_loss="none")
    assert cfg.teacher_mid_sigma == pytest.approx(flow_sigmas(steps, shift)[mid].item(), abs=1e-6)
    assert cfg.sigma_2_is_teacher_state == (abs(cfg.teacher_mid_sigma - cfg.sigma_2) < 1e-4)
    assert TurboConfig().sigma_2_is_teacher_state  # 0.75: the 8-step shift-3 teacher after 4 steps
