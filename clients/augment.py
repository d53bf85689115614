"""Tensor-only image augmentations for SemiFL (no torchvision, no PIL), driven by a ``torch.Generator``.

Reference
---------
Diao, Ding, Tarokh, SemiFL, NeurIPS 2022 (arXiv 2106.01432); official code
diaoenmao/SemiFL-Semi-Supervised-Federated-Learning-for-Unlabeled-Clients-with-Alternate-Training
(``src/data.py::FixTransform``, ``src/datasets/randaugment.py``). Spec: ``server-algorithms.md`` section 2.

* weak ``alpha(x)``: random horizontal flip, then a random crop of the image padded by 4 pixels
  (reflect padding).
* strong ``A(x)``: weak, then RandAugment(n = 2, m = 10) as in the reference: each of the ``n`` ops is
  drawn uniformly from the pool and applied with a probability drawn from U(0.2, 0.8); magnitudes
  follow the reference's ``v * max / 10`` mapping. Deviations (documented): translations use at most
  30 % of the side (the reference's "Const" variant moves 100 px at m = 10, which blanks a 32-px
  image) and cutout covers at most half of the side (reference: 40 px).
* mixup with ``lambda ~ Beta(0.75, 0.75)`` (sampled with the generator, Marsaglia–Tsang gammas).

Inputs are ``(N, C, H, W)`` tensors with values in ``[0, 1]`` (floating) or ``uint8`` (``[0, 255]``); the
output has the input's shape, dtype and device. Every random draw comes from the given generator, so
the same generator state gives the same output. ``H``/``W`` need not be equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "RANDAUGMENT_OPS", "adjust_brightness", "adjust_color", "adjust_contrast", "adjust_sharpness",
    "affine", "autocontrast", "cutout", "equalize", "invert", "mixup", "mixup_cross_entropy",
    "posterize", "random_crop", "random_flip", "random_translate", "rotate", "sample_beta", "shear",
    "solarize", "strong_augment", "translate", "weak_augment",
]


# ----------------------------------------------------------------------------------------------- helpers
def _rand(gen: torch.Generator, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device, dtype=torch.float64).to(like.device)


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``(N,)`` value to ``(N, 1, 1, 1)`` in ``x``'s dtype."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, 1, 1, 1) if v.ndim else v


def _float_io(fn: Callable) -> Callable:
    """Run ``fn`` in floating point on ``[0, 1]`` and restore a ``uint8`` input's dtype."""
    def wrapper(x: torch.Tensor, *args, **kwargs):
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            out = fn(x.float() / 255.0, *args, **kwargs)
            return (out * 255.0).round().clamp(0, 255).to(torch.uint8)
        return fn(x, *args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor) -> torch.Tensor:
    f = _per_sample(factor, x)
    return (degenerate + f * (x - degenerate)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------- weak
@_float_io
def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability ``p``."""
    flip = _rand(gen, x.shape[0], x) < p
    return torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)


@_float_io
def random_crop(x: torch.Tensor, gen: torch.Generator, padding: int = 4, pad_mode: str = "reflect",
                fill: float = 0.0) -> torch.Tensor:
    """Pad by ``padding`` pixels (``"reflect"``, ``"replicate"`` or ``"constant"``) and crop back at a
    random offset per image; ``padding = 0`` is the identity. Reflect padding needs ``padding < H, W``;
    tiny images fall back to ``"replicate"``."""
    if padding == 0:
        return x.clone()
    n, c, h, w = x.shape
    if pad_mode == "reflect" and padding >= min(h, w):
        pad_mode = "replicate"
    if pad_mode == "constant":
        xp = F.pad(x, (padding,) * 4, mode="constant", value=fill)
    else:
        xp = F.pad(x, (padding,) * 4, mode=pad_mode)
    span = 2 * padding + 1
    dy = torch.randint(span, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(span, (n,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    xp = xp.gather(2, rows.expand(n, c, h, xp.shape[3]))
    return xp.gather(3, cols.expand(n, c, h, w))


def random_translate(x: torch.Tensor, gen: torch.Generator, max_shift: int, fill: float = 0.0) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with ``fill``."""
    return random_crop(x, gen, padding=max_shift, pad_mode="constant", fill=fill)


def weak_augment(x: torch.Tensor, gen: torch.Generator, flip: bool = True, padding: int = 4,
                 pad_mode: str = "reflect") -> torch.Tensor:
    """SemiFL's weak view: flip (p = 0.5) then pad-and-crop; ``flip=False, padding=0`` is the identity."""
    out = random_flip(x, gen) if flip else x.clone()
    return random_crop(out, gen, padding=padding, pad_mode=pad_mode)


# ----------------------------------------------------------------------------------------------- colour ops
@_float_io
def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with black; ``factor = 1`` is the identity."""
    return _blend(x, torch.zeros_like(x), factor)


@_float_io
def adjust_color(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the grayscale image (saturation); ``factor = 1`` is the identity."""
    return _blend(x, _gray(x).expand_as(x), factor)


@_float_io
def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the mean gray level of each image; ``factor = 1`` is the identity."""
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)


@_float_io
def adjust_sharpness(x: torch.Tensor, factor) -> torch.Tensor:
    """Blend with a smoothed image (PIL's 3x3 smooth kernel, borders kept); ``factor = 1`` is the identity."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x.clone()
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13.0
    c = x.shape[1]
    smooth = F.conv2d(x, k.expand(c, 1, 3, 3), groups=c)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, factor)


@_float_io
def posterize(x: torch.Tensor, bits) -> torch.Tensor:
    """Keep the top ``bits`` bits of every 8-bit value; ``bits >= 8`` is the identity."""
    b = torch.as_tensor(bits, device=x.device).reshape(-1).expand(x.shape[0]).long()
    q = (x * 255.0).floor().clamp(0, 255).long()
    step = torch.pow(2, (8 - b).clamp(min=0)).reshape(-1, 1, 1, 1)
    out = ((q // step) * step).to(x.dtype) / 255.0
    return torch.where((b >= 8).reshape(-1, 1, 1, 1), x, out)


@_float_io
def solarize(x: torch.Tensor, threshold) -> torch.Tensor:
    """Invert values ``>= threshold``; ``threshold > 1`` is the identity."""
    return torch.where(x >= _per_sample(threshold, x), 1.0 - x, x)


@_float_io
def invert(x: torch.Tensor) -> torch.Tensor:
    """``1 - x``."""
    return 1.0 - x


@_float_io
def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch every channel of every image to ``[0, 1]`` (constant channels unchanged)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp(min=1e-12), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x)


@_float_io
def equalize(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Histogram equalisation per channel of every image on ``bins`` levels (constant channels unchanged)."""
    n, c, h, w = x.shape
    q = (x * (bins - 1)).round().clamp(0, bins - 1).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, bins, dtype=torch.float64, device=x.device).scatter_add_(
        1, q, torch.ones_like(q, dtype=torch.float64))
    cdf = hist.cumsum(dim=1)
    cdf_min = cdf.gather(1, q.min(dim=1, keepdim=True).values)
    denom = (h * w) - cdf_min
    mapped = ((cdf.gather(1, q) - cdf_min) / denom.clamp(min=1)).to(x.dtype)
    out = torch.where(denom > 0, mapped, x.reshape(n * c, h * w))
    return out.reshape(n, c, h, w)


# ----------------------------------------------------------------------------------------------- geometry
@_float_io
def affine(x: torch.Tensor, matrix: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Resample with per-image ``(N, 2, 3)`` pixel-space maps ``p_in = A p_out + t`` (origin at the centre).

    Bilinear interpolation; outside pixels get ``fill``. The identity matrix returns ``x``.
    """
    n, _, h, w = x.shape
    m = matrix.to(device=x.device, dtype=x.dtype).reshape(n, 2, 3).clone()
    theta = m.clone()
    theta[:, 0, 1] = m[:, 0, 1] * h / w
    theta[:, 1, 0] = m[:, 1, 0] * w / h
    theta[:, 0, 2] = m[:, 0, 2] * 2.0 / w
    theta[:, 1, 2] = m[:, 1, 2] * 2.0 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if fill != 0.0:
        inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        out = out + fill * (1.0 - inside)
    return out


def _eye(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, dtype=torch.float64, device=x.device).repeat(n, 1, 1)


def rotate(x: torch.Tensor, degrees, fill: float = 0.0) -> torch.Tensor:
    """Rotate each image about its centre by ``degrees`` (scalar or ``(N,)``)."""
    a = torch.as_tensor(degrees, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0]) * math.pi / 180
    m = _eye(x.shape[0], x)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return affine(x, m, fill)


def shear(x: torch.Tensor, amount, axis: str = "x", fill: float = 0.0) -> torch.Tensor:
    """Shear along ``axis`` (``"x"``: ``x_in = x + amount * y``)."""
    v = torch.as_tensor(amount, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
    m = _eye(x.shape[0], x)
    m[:, (0 if axis == "x" else 1), (1 if axis == "x" else 0)] = v
    return affine(x, m, fill)


def translate(x: torch.Tensor, pixels, axis: str = "x", fill: float = 0.0) -> torch.Tensor:
    """Shift by ``pixels`` (float allowed) along ``axis``; the content moves by ``-pixels``, as PIL."""
    v = torch.as_tensor(pixels, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
    m = _eye(x.shape[0], x)
    m[:, (0 if axis == "x" else 1), 2] = v
    return affine(x, m, fill)


@_float_io
def cutout(x: torch.Tensor, gen: torch.Generator, size, fill: float = 0.5) -> torch.Tensor:
    """Paint a square of side ``size * min(H, W)`` (fraction, scalar or ``(N,)``) at a random centre."""
    n, _, h, w = x.shape
    side = (torch.as_tensor(size, dtype=torch.float64, device=x.device).reshape(-1).expand(n) * min(h, w)).round()
    cy, cx = _rand(gen, n, x) * h, _rand(gen, n, x) * w
    y0, x0 = (cy - side / 2).floor().clamp(min=0), (cx - side / 2).floor().clamp(min=0)
    y1, x1 = (y0 + side).clamp(max=h), (x0 + side).clamp(max=w)
    ys = torch.arange(h, device=x.device, dtype=torch.float64)[None, :, None]
    xs = torch.arange(w, device=x.device, dtype=torch.float64)[None, None, :]
    box = (ys >= y0[:, None, None]) & (ys < y1[:, None, None]) & (xs >= x0[:, None, None]) & (xs < x1[:, None, None])
    return torch.where(box[:, None], torch.full_like(x, fill), x)


# ----------------------------------------------------------------------------------------------- RandAugment
def _signed(gen, n, x, v):
    sign = torch.where(_rand(gen, n, x) < 0.5, -1.0, 1.0).to(torch.float64)
    return sign * v


def _enhance(m):
    return 1.8 * m / 10 + 0.1


# name -> op(x, gen, magnitude); the pool of the reference's rand_augment_pool (with the deviations above)
RANDAUGMENT_OPS: dict[str, Callable] = {
    "autocontrast": lambda x, g, m: autocontrast(x),
    "brightness": lambda x, g, m: adjust_brightness(x, _enhance(m)),
    "color": lambda x, g, m: adjust_color(x, _enhance(m)),
    "contrast": lambda x, g, m: adjust_contrast(x, _enhance(m)),
    "cutout": lambda x, g, m: cutout(x, g, 0.5 * m / 10),
    "equalize": lambda x, g, m: equalize(x),
    "invert": lambda x, g, m: invert(x),
    "posterize": lambda x, g, m: posterize(x, int(4 * m / 10)),
    "rotate": lambda x, g, m: rotate(x, _signed(g, x.shape[0], x, 30.0 * m / 10)),
    "sharpness": lambda x, g, m: adjust_sharpness(x, _enhance(m)),
    "shear_x": lambda x, g, m: shear(x, _signed(g, x.shape[0], x, 0.3 * m / 10), "x"),
    "shear_y": lambda x, g, m: shear(x, _signed(g, x.shape[0], x, 0.3 * m / 10), "y"),
    "solarize": lambda x, g, m: solarize(x, (256 - int(256 * m / 10)) / 255.0),
    "translate_x": lambda x, g, m: translate(x, _signed(g, x.shape[0], x, 0.3 * m / 10 * x.shape[-1]), "x"),
    "translate_y": lambda x, g, m: translate(x, _signed(g, x.shape[0], x, 0.3 * m / 10 * x.shape[-2]), "y"),
}


def strong_augment(x: torch.Tensor, gen: torch.Generator, num_ops: int = 2, magnitude: float = 10,
                   ops: Sequence[str] | None = None, prob_range: tuple[float, float] = (0.2, 0.8),
                   weak_first: bool = True) -> torch.Tensor:
    """SemiFL's strong view ``A(x)``: weak view, then RandAugment(``num_ops``, ``magnitude``) per image.

    ``num_ops = 0`` with ``weak_first = False`` is the identity.
    """
    names = list(RANDAUGMENT_OPS) if ops is None else list(ops)
    unknown = [o for o in names if o not in RANDAUGMENT_OPS]
    if unknown:
        raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(RANDAUGMENT_OPS)}")
    out = weak_augment(x, gen) if weak_first else x.clone()
    n = x.shape[0]
    for _ in range(num_ops):
        choice = torch.randint(len(names), (n,), generator=gen, device=gen.device).to(x.device)
        lo, hi = prob_range
        prob = lo + (hi - lo) * _rand(gen, n, x)
        apply = _rand(gen, n, x) + prob >= 1.0
        for j, name in enumerate(names):
            sel = (choice == j) & apply
            if bool(sel.any()):
                out[sel] = RANDAUGMENT_OPS[name](out[sel], gen, magnitude)
    return out


# ----------------------------------------------------------------------------------------------- mixup
def _gamma(gen: torch.Generator, k: float, n: int) -> torch.Tensor:
    """Gamma(k, 1) samples (Marsaglia–Tsang; boosted for ``k < 1``), float64 on the generator's device."""
    boost = k < 1
    d = (k + 1 if boost else k) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=gen.device)
    todo = torch.arange(n, device=gen.device)
    while todo.numel():
        z = torch.randn(todo.numel(), generator=gen, device=gen.device, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=gen, device=gen.device, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if boost:
        out = out * torch.rand(n, generator=gen, device=gen.device, dtype=torch.float64) ** (1.0 / k)
    return out


def sample_beta(gen: torch.Generator, alpha: float = 0.75, beta: float | None = None, size: int = 1) -> torch.Tensor:
    """``size`` draws of Beta(alpha, beta) (``beta`` defaults to ``alpha``), float64."""
    beta = alpha if beta is None else beta
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta parameters must be > 0, got {alpha}, {beta}")
    a, b = _gamma(gen, alpha, size), _gamma(gen, beta, size)
    return a / (a + b)


def mixup(x_a: torch.Tensor, x_b: torch.Tensor, lam) -> torch.Tensor:
    """``lam * x_a + (1 - lam) * x_b`` (``lam`` scalar or one per sample)."""
    lam_t = torch.as_tensor(lam, dtype=x_a.dtype, device=x_a.device)
    if lam_t.ndim:
        lam_t = lam_t.reshape(-1, *([1] * (x_a.ndim - 1)))
    return lam_t * x_a + (1 - lam_t) * x_b


def mixup_cross_entropy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam) -> torch.Tensor:
    """``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`` (batch mean; ``lam`` scalar or per sample)."""
    lam_t = torch.as_tensor(lam, dtype=logits.dtype, device=logits.device)
    ce_a = F.cross_entropy(logits, y_a, reduction="none")
    ce_b = F.cross_entropy(logits, y_b, reduction="none")
    return (lam_t * ce_a + (1 - lam_t) * ce_b).mean()
