"""Why ``run.vectorize = "auto"`` keeps convolutional clients per client on a CPU (issue 13, goal 2).

One local step (forward, backward, per-client gradients) of ``K`` clients, each with its own weights
and a batch of ``B`` images, for the CNN of the ``few-cnn`` workload (``model.name = "cnn"``, channels
16, 32, 1×28×28 inputs), 1 torch thread, CPU seconds per step of all ``K`` clients:

* ``per client, contiguous``     one model per client, PyTorch's default layout (the plain loop);
* ``per client, channels-last``  the same with ``fedsim.models.to_fast_layout`` (fedsim's per-client
                                 path on CPU: oneDNN's convolution kernels);
* ``vmap (vectorize = true)``    ``torch.vmap`` of ``functional_call`` over stacked weights, as
                                 ``clients/batched.py`` runs convolutional models: functorch turns
                                 each convolution into one grouped convolution over the clients;
* ``grouped, channels-last``     the grouped convolution written by hand in channels-last layout
                                 (what a stacked convolutional plan could reach at best).

Repeats are interleaved; medians are printed with the ratio to the plain loop's row.

Usage:  python bench/bench_conv_batching.py [--clients 10] [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fedsim.config import ModelConfig
from fedsim.models import build_model, to_fast_layout


def _models(k: int) -> list[torch.nn.Module]:
    cfg = ModelConfig(name="cnn", channels=[16, 32])
    return [build_model(cfg, (1, 28, 28), 10, seed=i) for i in range(k)]


def per_client(models, x, y):
    def step():
        for m, xb, yb in zip(models, x, y):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), yb).backward()
    return step


def vmapped(models, x, y):
    from torch.func import functional_call, grad, vmap

    base = models[0]
    names = [n for n, _ in base.named_parameters()]
    stacked = [torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names]

    def loss(params, xb, yb):
        return F.cross_entropy(functional_call(base, dict(zip(names, params)), (xb,)), yb)

    g = vmap(grad(loss))
    return lambda: g(stacked, x, y)


def grouped_channels_last(models, x, y):
    k, b = x.shape[:2]
    layers = [[m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))] for model in models]
    conv1, conv2, head = layers[0]

    def stacked(i: int, name: str) -> torch.Tensor:
        return torch.stack([getattr(ls[i], name).detach() for ls in layers]).requires_grad_()

    w1, b1, w2, b2, w3, b3 = (stacked(i, n) for i in range(3) for n in ("weight", "bias"))
    cl = torch.channels_last
    c1, c2 = conv1.out_channels, conv2.out_channels

    def step():
        h = x.transpose(0, 1).reshape(b, -1, 28, 28).contiguous(memory_format=cl)
        h = F.conv2d(h, w1.reshape(k * c1, -1, 3, 3).contiguous(memory_format=cl), b1.reshape(-1), padding=1, groups=k)
        h = F.max_pool2d(F.relu(h), 2)
        h = F.conv2d(h, w2.reshape(k * c2, -1, 3, 3).contiguous(memory_format=cl), b2.reshape(-1), padding=1, groups=k)
        h = F.max_pool2d(F.relu(h), 2)  # [B, K·c2, 7, 7]
        h = h.reshape(b, k, -1).transpose(0, 1)  # [K, B, c2·7·7], each client's features in (c, h, w) order
        logits = torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))
        ce = F.cross_entropy(logits.reshape(k * b, -1), y.reshape(-1), reduction="none").view(k, b)
        return torch.autograd.grad(ce.mean(1).sum(), [w1, b1, w2, b2, w3, b3])
    assert head.in_features == c2 * 49
    return step


def check_same_gradients(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest |difference| between the hand-written grouped step's gradients and the clients' own ones
    (so the timed rows do the same work)."""
    models = _models(x.shape[0])
    per_client(models, x, y)()
    own = [torch.stack([p.grad for p in params]) for params in zip(*[list(m.parameters()) for m in models])]
    grouped = grouped_channels_last(_models(x.shape[0]), x, y)()
    return max(float((a - g).abs().max()) for a, g in zip(own, grouped))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    k, b = args.clients, args.batch
    x, y = torch.randn(k, b, 1, 28, 28), torch.randint(0, 10, (k, b))
    diff = check_same_gradients(x, y)
    if diff > 1e-4:
        raise SystemExit(f"the grouped step's gradients differ from the clients' own by {diff:.2e}")
    cpu = torch.device("cpu")
    rows = {
        "per client, contiguous": per_client(_models(k), x, y),
        "per client, channels-last": per_client([to_fast_layout(m, cpu) for m in _models(k)], x, y),
        "vmap (vectorize = true)": vmapped(_models(k), x, y),
        "grouped, channels-last": grouped_channels_last(_models(k), x, y),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for step in rows.values():  # warm-up: first calls allocate, vmap imports torch._dynamo
        for _ in range(3):
            step()
    for _ in range(args.repeats):
        for name, step in rows.items():
            t0 = time.process_time()
            for _ in range(args.steps):
                step()
            times[name].append((time.process_time() - t0) / args.steps)
    plain = statistics.median(times["per client, contiguous"])
    print(f"grouped step's gradients = per-client gradients to {diff:.1e}")
    print(f"one step of {k} clients × batch {b}, CNN (16, 32) on 1×28×28, 1 thread, CPU ms "
          f"(median of {args.repeats})")
    for name, ts in times.items():
        med = statistics.median(ts)
        runs = ", ".join(f"{1000 * t:.1f}" for t in ts)
        print(f"  {name:28s} {1000 * med:7.1f} ms   {med / plain:5.2f}×   [{runs}]")


if __name__ == "__main__":
    main()
