"""The GDSO / GRPO online task (`zray.tasks.gdso`): method coefficients, worker state, checkpointed pi_ref."""

import dataclasses

import pytest

from jobs.recipes import tiny_cpu
from zray.tasks.gdso import GDSOTask


def test_grpo_is_gdso_without_pairwise_reward_and_direct_terms():
    cfg = tiny_cpu().train_teacher
    gdso = GDSOTask(model_dir="x", cfg=cfg, rollouts=object())
    grpo = GDSOTask(model_dir="x", cfg=dataclasses.replace(cfg, method="grpo"), rollouts=object())
    assert gdso.coefficients == {"lam_pt": 1.0, "lam_pw": 1.0, "alpha_pt": 0.5, "alpha_pw": 0.5}
    assert grpo.coefficients == {"lam_pt": 1.0, "lam_pw": 0.0, "alpha_pt": 0.0, "alpha_pw": 0.0}
    with pytest.raises(ValueError, match="method='sft'"):
        GDSOTask(model_dir="x", cfg=dataclasses.replace(cfg, method="sft"), rollouts=object())
