"""Tensor augmentations for SemiFL: shapes/dtypes, determinism, identities, semantics, mixup."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.clients import augment as aug
from fedsim.rng import torch_generator


def images(n=6, c=3, h=12, w=10, seed=0, dtype=torch.float32):
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


def gen(seed=0):
    return torch_generator(seed, "augment-test")


RANDOM_OPS = {
    "weak": lambda x, g: aug.weak_augment(x, g),
    "strong": lambda x, g: aug.strong_augment(x, g),
    "strong_all_ops": lambda x, g: aug.strong_augment(x, g, num_ops=6, prob_range=(1.0, 1.0)),
    "flip": lambda x, g: aug.random_flip(x, g),
    "crop": lambda x, g: aug.random_crop(x, g, 3),
    "translate": lambda x, g: aug.random_translate(x, g, 2),
    "cutout": lambda x, g: aug.cutout(x, g, 0.4),
}


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_shape_dtype_range_and_determinism(name, dtype):
    x = images(dtype=dtype)
    a = RANDOM_OPS[name](x, gen(1))
    b = RANDOM_OPS[name](x, gen(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    if dtype != torch.uint8:
        assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("op", sorted(aug.RANDAUGMENT_OPS))
def test_every_randaugment_op_keeps_shape_dtype_range(op):
    x = images(dtype=torch.float64)
    out = aug.RANDAUGMENT_OPS[op](x, gen(2), 10)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= -1e-12 and out.max() <= 1 + 1e-12


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(3, 16), st.integers(3, 16), st.integers(0, 2**31 - 1))
def test_strong_any_shape(n, c, h, w, seed):
    x = images(n, c, h, w, seed)
    out = aug.strong_augment(x, gen(seed), num_ops=3)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, aug.strong_augment(x, gen(seed), num_ops=3))


def test_different_generators_differ():
    x = images()
    assert not torch.equal(aug.strong_augment(x, gen(1)), aug.strong_augment(x, gen(2)))


def test_identity_settings():
    x = images(dtype=torch.float64)
    g = gen()
    assert torch.equal(aug.weak_augment(x, g, flip=False, padding=0), x)
    assert torch.equal(aug.strong_augment(x, g, num_ops=0, weak_first=False), x)
    assert torch.equal(aug.random_flip(x, g, p=0.0), x)
    assert torch.equal(aug.random_flip(x, g, p=1.0), x.flip(-1))
    assert torch.equal(aug.cutout(x, g, 0.0), x)
    for fn in (aug.adjust_brightness, aug.adjust_color, aug.adjust_contrast, aug.adjust_sharpness):
        torch.testing.assert_close(fn(x, 1.0), x, rtol=0, atol=1e-12)
    assert torch.equal(aug.posterize(x, 8), x)
    assert torch.equal(aug.solarize(x, 1.01), x)
    torch.testing.assert_close(aug.rotate(x, 0.0), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(aug.shear(x, 0.0, "y"), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(aug.translate(x, 0.0), x, rtol=0, atol=1e-12)
    u8 = images(dtype=torch.uint8)
    assert torch.equal(aug.adjust_brightness(u8, 1.0), u8)


def test_geometry_semantics():
    x = images(4, 2, 8, 8, dtype=torch.float64)
    moved = aug.translate(x, 2.0, "x")                       # content moves left by 2 pixels (PIL)
    torch.testing.assert_close(moved[..., :6], x[..., 2:])
    assert torch.all(moved[..., 6:] == 0)
    r = aug.rotate(x, 90.0)
    assert any(torch.allclose(r, torch.rot90(x, k, dims=(2, 3)), atol=1e-9) for k in (1, -1))
    crops = aug.random_crop(x, gen(3), 2, pad_mode="constant")
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        assert any(torch.equal(crops[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))


def test_colour_op_semantics():
    x = images(dtype=torch.float64)
    torch.testing.assert_close(aug.adjust_brightness(x, 0.0), torch.zeros_like(x))
    gray = aug.adjust_color(x, 0.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(aug.invert(aug.invert(x)), x)
    torch.testing.assert_close(aug.solarize(x, 0.0), 1 - x)
    q = aug.posterize(x, 1)
    assert set(torch.unique((q * 255).round()).tolist()) <= {0.0, 128.0}
    ac = aug.autocontrast(x * 0.5 + 0.2)
    torch.testing.assert_close(ac.amin(dim=(2, 3)), torch.zeros(6, 3, dtype=torch.float64))
    torch.testing.assert_close(ac.amax(dim=(2, 3)), torch.ones(6, 3, dtype=torch.float64))
    ramp = (torch.arange(64, dtype=torch.float64) / 63 * 0.2).reshape(1, 1, 8, 8)    # low-contrast ramp
    eq = aug.equalize(ramp)
    assert eq.max() == pytest.approx(1.0) and eq.min() == 0.0
    flat = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    assert torch.equal(aug.equalize(flat), flat) and torch.equal(aug.autocontrast(flat), flat)


def test_mixup_and_beta():
    xa, xb = images(seed=1), images(seed=2)
    assert torch.equal(aug.mixup(xa, xb, 1.0), xa) and torch.equal(aug.mixup(xa, xb, 0.0), xb)
    lam = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    mixed = aug.mixup(xa, xb, lam)
    assert torch.equal(mixed[0], xb[0]) and torch.equal(mixed[1], xa[1])
    b = aug.sample_beta(gen(4), 0.75, size=50_000)
    assert b.min() >= 0 and b.max() <= 1
    assert b.mean().item() == pytest.approx(0.5, abs=0.01) and b.var().item() == pytest.approx(0.1, abs=0.005)
    b2 = aug.sample_beta(gen(4), 2.0, 5.0, size=50_000)
    assert b2.mean().item() == pytest.approx(2 / 7, abs=0.005)
    assert torch.equal(aug.sample_beta(gen(9), size=5), aug.sample_beta(gen(9), size=5))


def test_mix_loss_with_lambda_one_is_fix_label_ce_on_weak_views():
    """Spec section 2 test (5)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 10, 5))
    x_fix, x_rand = images(seed=3), images(seed=4)
    y_fix, y_rand = torch.randint(5, (6,)), torch.randint(5, (6,))
    g = gen(5)
    weak_fix, weak_rand = aug.weak_augment(x_fix, g), aug.weak_augment(x_rand, g)
    loss = aug.mixup_cross_entropy(model(aug.mixup(weak_fix, weak_rand, 1.0)), y_fix, y_rand, 1.0)
    expected = torch.nn.functional.cross_entropy(model(weak_fix), y_fix)
    torch.testing.assert_close(loss, expected)
