"""zray.models.turbo: TwoStepStudent's step-decoupled parameterisations on the tiny zoo's Z-Image transformer."""

import pytest
import torch

from zray.models.generator import transformer_forward
from zray.models.turbo import TwoStepStudent


@pytest.fixture(scope="module")
def teacher(tiny_zoo_config, tmp_path_factory):
    # the zoo's generator (same config and seed), built alone: the VLMs are not needed here
    from diffusers import ZImageTransformer2DModel

    from zray.models.tiny import build_tiny_zimage

    path = build_tiny_zimage(tiny_zoo_config.generator, tmp_path_factory.mktemp("zimage_turbo"), image_size=64)
    model = ZImageTransformer2DModel.from_pretrained(str(path / "transformer"), dtype=torch.float32)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def lora_student(teacher):
    torch.manual_seed(0)
    return TwoStepStudent(teacher, decoupling="lora", lora_rank=2)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, 8, 8, generator=gen), [torch.randn(4 + i, 64, generator=gen) for i in range(batch)]


def grads(params):
    return [p.grad for p in params]


def got_grad(params):
    return any(g is not None and g.abs().sum() > 0 for g in grads(params))


def no_grad(params):
    return all(g is None for g in grads(params))


def test_every_variant_starts_as_the_teacher(teacher, lora_student):
    noise, cond = inputs()
    t = torch.zeros(2)
    ref = transformer_forward(teacher, noise, t, cond)
    for student in (TwoStepStudent(teacher), TwoStepStudent(teacher, decoupling="shared"), lora_student):
        for k in (1, 2):
            torch.testing.assert_close(student.step_fn(k)(noise, t, cond), ref)
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is copied, not modified


def test_copies_are_independent_parameters(teacher):
    student = TwoStepStudent(teacher)
    p1, p2 = dict(student.step1.named_parameters()), dict(student.step2.named_parameters())
    assert p1.keys() == p2.keys()
    assert all(p1[n].data_ptr() != p2[n].data_ptr() and p1[n].requires_grad and p2[n].requires_grad for n in p1)
    with torch.no_grad():
        student.step1.layers[0].attention.to_q.weight.add_(1.0)
    assert not torch.equal(student.step1.layers[0].attention.to_q.weight, student.step2.layers[0].attention.to_q.weight)
    assert sum(p.numel() for p in student.parameters()) == 2 * sum(p.numel() for p in teacher.parameters())


def test_shared_uses_one_parameter_set(teacher):
    student = TwoStepStudent(teacher, decoupling="shared")
    assert student.transformer(1) is student.transformer(2)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.parameters())


@pytest.mark.parametrize("detach", [False, True])
def test_copies_step1_gets_the_final_losses_gradient_only_end_to_end(teacher, detach):
    student = TwoStepStudent(teacher)
    noise, cond = inputs()
    x0_1, x_s2, x0_2 = student(noise, cond, detach_steps=detach)
    assert x0_1.shape == x_s2.shape == x0_2.shape == noise.shape
    x0_2.square().mean().backward()
    assert got_grad(student.step2.parameters())
    if detach:
        assert no_grad(student.step1.parameters())
    else:
        assert got_grad(student.step1.parameters())


def test_lora_only_adapters_train(lora_student):
    trainable = [n for n, p in lora_student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    a1, a2 = lora_student.adapter_parameters(1), lora_student.adapter_parameters(2)
    assert len(a1) == len(a2) > 0 and len(trainable) == len(a1) + len(a2)
    assert {id(p) for p in a1}.isdisjoint(id(p) for p in a2)


@pytest.mark.parametrize("detach", [False, True])
def test_lora_each_adapter_gets_gradient_from_its_own_step(lora_student, detach):
    student = lora_student
    a1, a2 = student.adapter_parameters(1), student.adapter_parameters(2)
    noise, cond = inputs(seed=1)
    student.zero_grad(set_to_none=True)
    x0_1, _, x0_2 = student(noise, cond, detach_steps=detach)
    x0_2.square().mean().backward()
    assert got_grad(a2)
    # detached: step 1's adapter is not in the final loss's graph; end to end it is (peft's set_adapter would
    # have cut it: TwoStepStudent keeps the inactive adapter's requires_grad)
    assert no_grad(a1) if detach else got_grad(a1)
    assert all(p.requires_grad for p in a1 + a2)
    student.zero_grad(set_to_none=True)
    x0_1, _, _ = student(noise, cond, detach_steps=detach)
    x0_1.square().mean().backward()
    assert got_grad(a1) and no_grad(a2)


@pytest.mark.parametrize("decoupling", ["copies", "shared", "lora"])
def test_save_and_load_round_trip(teacher, decoupling, tmp_path):
    torch.manual_seed(0)
    student = TwoStepStudent(teacher, decoupling=decoupling, lora_rank=2)
    with torch.no_grad():  # make the steps differ from the teacher and from each other
        for k, scale in ((1, 0.01), (2, -0.02)):
            params = student.adapter_parameters(k) if decoupling == "lora" else student.transformer(k).parameters()
            for p in params:
                p.add_(scale * torch.randn_like(p))
    out = student.save_pretrained(tmp_path / "student")
    loaded = TwoStepStudent.from_pretrained(out)
    assert loaded.decoupling == decoupling
    noise, cond = inputs(seed=2)
    with torch.no_grad():  # the perturbation shows: a load that dropped it would not pass the check below
        assert not torch.allclose(student.step_fn(1)(noise, torch.zeros(2), cond),
                                  transformer_forward(teacher, noise, torch.zeros(2), cond), atol=1e-4)
    with torch.no_grad():
        for k, t in ((1, torch.zeros(2)), (2, torch.full((2,), 0.25))):
            torch.testing.assert_close(loaded.step_fn(k)(noise, t, cond), student.step_fn(k)(noise, t, cond))
    if decoupling == "copies":  # each step loads in diffusers alone
        from diffusers import ZImageTransformer2DModel

        step2 = ZImageTransformer2DModel.from_pretrained(str(out / "transformer_step2"))
        torch.testing.assert_close(transformer_forward(step2, noise, torch.zeros(2), cond),
                                   student.step_fn(2)(noise, torch.zeros(2), cond).detach())
    if decoupling == "lora":
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
            {n for n, p in student.named_parameters() if p.requires_grad}


def test_argument_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="decoupling='split' is not allowed"):
        TwoStepStudent(teacher, decoupling="split")
    with pytest.raises(ValueError, match="lora_rank=0"):
        TwoStepStudent(teacher, decoupling="lora", lora_rank=0)
    student = TwoStepStudent(teacher, decoupling="shared")
    with pytest.raises(ValueError, match="k=3 is not allowed"):
        student.step_fn(3)
    with pytest.raises(FileNotFoundError, match="turbo_student.json"):
        TwoStepStudent.from_pretrained(tmp_path)


def test_adversarial_loss_reaches_both_steps_through_the_frozen_discriminator(teacher):
    """The generator step end to end: student (copies) -> x0_2 -> LADD discriminator -> L_G -> backward."""
    from zray.losses.turbo import generator_loss
    from zray.models.discriminator import LADDDiscriminator

    import copy

    torch.manual_seed(0)
    disc = LADDDiscriminator(copy.deepcopy(teacher), blocks=(-1,), head_hidden=8)
    student = TwoStepStudent(disc.transformer)  # copies of a hooked transformer: the copies' hooks stay inactive
    noise, cond = inputs(seed=3)
    _, x_s2, x0_2 = student(noise, cond)
    logits = disc(x0_2, cond, generator=torch.Generator().manual_seed(0))
    loss, metrics = generator_loss(logits, step1="none", lam_adv=1.0)
    loss.backward()
    assert got_grad(student.step1.parameters()) and got_grad(student.step2.parameters())
    assert no_grad(disc.transformer.parameters()) and got_grad(disc.heads.parameters())
    assert set(metrics) == {"adv_loss", "d_fake_mean", "g_loss"}
