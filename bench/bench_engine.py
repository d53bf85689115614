"""Local engine vs a plain PyTorch loop doing exactly the same sample-steps, in one process.

Workloads (DESIGN.md §5):
  * many-small: 1000 clients (LEAF Synthetic(1,1) features), 50 sampled per round, an MLP;
  * few-cnn:    10 clients of 1x28x28 synthetic images, all sampled, a small CNN.

The plain loop is the cost floor: one model, per sampled client load the global weights, run the
same batches (same sizes, same number of steps), accumulate the example-weighted average. The
fedsim figure is the sum of the rounds' wall time (sampling, messages, ClientApp, validation,
aggregation), without the one-off set-up and the end-of-run plots; the total is printed too.

Each workload is run three times through the engine: the per-client path (``run.vectorize =
false``), the default (``"auto"``: eligible clients of a round trained together with ``torch.vmap``,
see clients/batched.py; conv models stay per client on CPU) and ``run.vectorize = true`` (conv
models batched too, as grouped convolutions). Repeats interleave the runs so that the ratios share
the machine's load; medians are reported. ``bench_users.py`` (``make bench``) times whole processes.

Usage:  python bench/bench_engine.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedsim.config import scenario_from_dict
from fedsim.data.federation import federation_of
from fedsim.engines.local import run_local
from fedsim.models import build_model
from fedsim.rng import derive_seed, numpy_rng, torch_generator
from fedsim.results import read_jsonl

WORKLOADS = {
    "many-small-mlp": {
        "run": {"name": "bench-many", "rounds": 5, "seed": 0, "progress": False, "checkpoint_every": 0,
                "eval_every": 1000},
        "data": {"dataset": "synthetic", "num_clients": 1000, "partitioner": "iid",
                 "options": {"num_samples": 60000, "num_users": 1000}},
        "model": {"name": "mlp", "hidden": [64]},
        "client": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        "strategy": {"name": "fedavg", "fraction_train": 0.05, "min_train_clients": 2},
    },
    "few-cnn": {
        "run": {"name": "bench-cnn", "rounds": 3, "seed": 0, "progress": False, "checkpoint_every": 0,
                "eval_every": 1000},
        "data": {"dataset": "synthetic_images", "num_clients": 10, "partitioner": "iid",
                 "options": {"num_samples": 3000}},
        "model": {"name": "cnn", "channels": [16, 32]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "strategy": {"name": "fedavg", "fraction_train": 1.0, "min_train_clients": 2},
    },
}


def fedsim_time(raw: dict) -> tuple[float, float]:
    scen = scenario_from_dict(raw)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        run_local(scen, Path(d) / "run")
        total = time.perf_counter() - t0
        rows = read_jsonl(Path(d) / "run" / "metrics.jsonl")
    return sum(r.get("wall_s", 0.0) for r in rows), total


def plain_time(raw: dict) -> float:
    """The same federated workload as a bare PyTorch loop (no Flower, no records, no validation)."""
    scen = scenario_from_dict(raw)
    d, c = scen.data, scen.client
    torch.set_num_threads(scen.run.threads)
    fed = federation_of(scen)
    ds = fed.dataset
    model = build_model(scen.model, tuple(fed.input_shape), int(fed.num_classes),
                        derive_seed(scen.run.seed, "model-init"))
    data = {i: (torch.tensor(ds.x_train[idx], dtype=torch.float32), torch.tensor(ds.y_train[idx]))
            for i, idx in enumerate(fed.client_indices)}
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    m = max(int(np.floor(scen.strategy.fraction_train * d.num_clients)), scen.strategy.min_train_clients)
    t0 = time.perf_counter()
    for rnd in range(1, scen.run.rounds + 1):
        chosen = sorted(int(p) for p in numpy_rng(scen.run.seed, "sample", rnd).choice(d.num_clients, m, replace=False))
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in glob.items()}
        total = 0
        for pid in chosen:
            model.load_state_dict(glob)
            opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
            x, y = data[pid]
            g = torch_generator(scen.run.seed, "train", rnd, pid)
            for _ in range(c.epochs):
                order = torch.randperm(x.shape[0], generator=g)
                for s in range(0, x.shape[0], c.batch_size):
                    idx = order[s:s + c.batch_size]
                    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            n = x.shape[0]
            total += n
            for k, v in model.state_dict().items():
                acc[k] += n * v.double()
        glob = {k: (v / total).to(glob[k].dtype) for k, v in acc.items()}
    return time.perf_counter() - t0


def vectorised(raw: dict, setting: bool | str = True) -> dict:
    out = copy.deepcopy(raw)
    out["run"]["vectorize"] = setting
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=sorted(WORKLOADS))
    args = ap.parse_args()
    results = {}
    for name, raw in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        vec, per_client = vectorised(raw), vectorised(raw, False)
        plain_time(raw)  # warm-up: dataset cache, allocator, kernels
        fedsim_time(raw)
        fedsim_time(vec)
        fedsim_time(per_client)
        plain, engine, totals, engine_v, totals_v, engine_p = [], [], [], [], [], []
        for _ in range(args.repeats):
            plain.append(plain_time(raw))
            r, t = fedsim_time(raw)
            engine.append(r)
            totals.append(t)
            r, t = fedsim_time(vec)
            engine_v.append(r)
            totals_v.append(t)
            engine_p.append(fedsim_time(per_client)[0])
        p, e, v = statistics.median(plain), statistics.median(engine), statistics.median(engine_v)
        pc = statistics.median(engine_p)
        results[name] = {"plain_s": round(p, 3), "per_client_rounds_s": round(pc, 3),
                         "per_client_ratio": round(pc / p, 3), "fedsim_rounds_s": round(e, 3),
                         "fedsim_total_s": round(statistics.median(totals), 3), "ratio": round(e / p, 3),
                         "vectorised_rounds_s": round(v, 3),
                         "vectorised_total_s": round(statistics.median(totals_v), 3),
                         "vectorised_ratio": round(v / p, 3),
                         "ratios": [round(a / b, 3) for a, b in zip(engine, plain)],
                         "vectorised_ratios": [round(a / b, 3) for a, b in zip(engine_v, plain)]}
        print(f"{name:16s} plain {p:7.3f} s   per-client path (vectorize=false) {pc:7.3f} s   ratio "
              f"{pc / p:5.2f}x", flush=True)
        print(f"{'':16s} default {e:7.3f} s   ratio {e / p:5.2f}x   "
              f"(whole run incl. set-up and plots {statistics.median(totals):.2f} s)", flush=True)
        print(f"{'':16s} {'':15s}   vectorize=true {v:7.3f} s   ratio {v / p:5.2f}x   "
              f"(whole run {statistics.median(totals_v):.2f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
