"""zray.models.discriminator: the LADD-style Turbo++ discriminator on the tiny zoo's Z-Image transformer."""

import pytest
import torch

from zray.models.discriminator import LADDDiscriminator, TokenHead


@pytest.fixture(scope="module")
def generator_dir(tiny_zoo_config, tmp_path_factory):
    # the zoo's generator (same config and seed), built alone: the VLMs are not needed here
    from zray.models.tiny import build_tiny_zimage

    return build_tiny_zimage(tiny_zoo_config.generator, tmp_path_factory.mktemp("zimage_disc"), image_size=64)


@pytest.fixture(scope="module")
def transformer(generator_dir):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(str(generator_dir / "transformer"), dtype=torch.float32)


def make_disc(transformer, **kw):
    import copy

    torch.manual_seed(0)
    return LADDDiscriminator(copy.deepcopy(transformer), **kw)


def inputs(batch=2, seed=0, dim=64):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 16, 8, 8, generator=gen)
    cond = [torch.randn(5 + i, dim, generator=gen) for i in range(batch)]
    return x0, cond


@pytest.mark.parametrize("head", ["conv", "linear"])
def test_one_logit_per_sample_and_only_heads_train(transformer, head):
    disc = make_disc(transformer, blocks=(0, -1), head=head, head_hidden=8)
    x0, cond = inputs(3)
    logits = disc(x0, cond, generator=torch.Generator().manual_seed(1))
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.") for n in trainable)
    assert trainable == {f"heads.{n}" for n, _ in disc.heads.named_parameters()}
    assert set(disc.heads_state_dict()) == {n[len("heads."):] for n in trainable}
    assert disc.blocks == (0, 1)


def test_gradient_reaches_fake_latents_through_the_frozen_transformer(transformer):
    disc = make_disc(transformer, blocks=(1,), head_hidden=8)
    x0, cond = inputs(2)
    fake = x0.clone().requires_grad_(True)
    logits = disc(fake, cond, tau_B=torch.tensor([0.3, 0.6]), noise_BCHW=torch.randn_like(x0))
    (-logits.mean()).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.transformer.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    # at tau = 1 the input is pure noise: no gradient reaches x0
    fake.grad = None
    disc(fake, cond, tau_B=torch.ones(2), noise_BCHW=torch.randn_like(x0)).sum().backward()
    assert fake.grad.abs().max() == 0


def test_deterministic_for_a_fixed_tau_or_generator(transformer):
    disc = make_disc(transformer, head_hidden=8)
    x0, cond = inputs(2)
    a = disc(x0, cond, generator=torch.Generator().manual_seed(5))
    b = disc(x0, cond, generator=torch.Generator().manual_seed(5))
    c = disc(x0, cond, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn_like(x0)
    tau = torch.tensor([0.2, 0.7])
    logits = disc(x0, cond, tau_B=tau, noise_BCHW=noise)
    assert torch.equal(logits, disc(x0, cond, tau_B=tau, noise_BCHW=noise))
    per_block = disc(x0, cond, tau_B=tau, noise_BCHW=noise, per_block=True)
    assert per_block.shape == (2, 2) and torch.equal(per_block.mean(0), logits)
    taus = disc.sample_tau(1000, torch.Generator().manual_seed(0))
    assert 0.1 <= taus.min() and taus.max() <= 0.9


def test_features_are_the_blocks_image_tokens(transformer):
    """The hooked tokens are the block outputs on the image part of the unified sequence, and leave the
    transformer's own forward (used for teacher sampling) unchanged."""
    from zray.models.generator import transformer_forward

    disc = make_disc(transformer, blocks=(0, 1))
    x0, cond = inputs(2)
    t = torch.tensor([0.4, 0.4])
    f0, f1 = disc.features(x0, t, cond)
    assert f0.shape == f1.shape == (2, 16, 64)  # (8 / 2) x (8 / 2) image tokens, width 64
    seen = {}
    handle = disc.transformer.layers[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    u = transformer_forward(disc.transformer, x0, t, cond)  # a full forward: hooks inactive, output intact
    handle.remove()
    assert torch.equal(seen["out"][:, :16], f1)
    torch.testing.assert_close(u, transformer_forward(transformer, x0, t, cond))


def test_train_mode_keeps_the_transformer_in_eval(transformer):
    disc = make_disc(transformer, head_hidden=8).train()
    assert disc.heads.training and not disc.transformer.training


def test_argument_errors(transformer):
    with pytest.raises(ValueError, match=r"blocks=\(2,\).*\[-2, 2\)"):
        make_disc(transformer, blocks=(2,))
    with pytest.raises(ValueError, match="distinct layers"):
        make_disc(transformer, blocks=(1, -1))
    with pytest.raises(ValueError, match="blocks=()"):
        make_disc(transformer, blocks=())
    with pytest.raises(ValueError, match=r"tau_range=\(0.8, 0.2\)"):
        make_disc(transformer, tau_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="kind='mlp'"):
        TokenHead(8, "mlp")
    disc = make_disc(transformer, head_hidden=8)
    x0, cond = inputs(2)
    with pytest.raises(ValueError, match=r"tau_B has shape \(3,\)"):
        disc(x0, cond, tau_B=torch.zeros(3))
    with pytest.raises(ValueError, match="1 caption features for a batch of 2"):
        disc(x0, cond[:1])
    with pytest.raises(ValueError, match="multiples of 2"):
        disc(torch.zeros(2, 16, 7, 8), cond)
