"""`make bench`: fedsim as a user runs it, against a plain PyTorch loop and Flower's own Ray simulation.

Rows, each a fresh process timed from outside (imports, data, round 0 evaluation, run directory
and plots included — what a user waits for), on the two workloads of ``bench_engine.py``:

* ``plain``       a bare single-process PyTorch loop: same data, same initial weights, same sampled
                  clients, same per-client batches, example-weighted average (the cost floor);
* ``default``     ``fedsim run`` with default settings (local engine, ``run.vectorize = "auto"``);
* ``vectorised``  ``fedsim run --set run.vectorize=true`` (convolutional models batched on CPU too);
* ``ray``         ``fedsim run --engine ray`` (the Ray engine as it is);
* ``flower``      ``flwr.simulation.run_simulation`` with Flower's vanilla ``FedAvg`` and a vanilla
                  ClientApp training the same way on the same data and initial weights.

Per row: median wall and CPU seconds (the process and its reaped children, ``os.wait4``), the
largest peak RSS of one process, and the largest |weight difference| of the final model to the
plain loop replaying the clients that row's server actually sampled (Flower samples its own).
The machine's load (``os.getloadavg``) is printed beside the figures. Writes the table to its
section of ``bench/RESULTS.md`` and a plot to ``bench/bench_users.png``.

Usage:  python bench/bench_users.py [--quick] [--repeats 3] [--rows plain,default,...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
ROWS = ("plain", "default", "vectorised", "ray", "flower")
ROUNDS = {"many-small-mlp": 20, "few-cnn": 5}  # the issue's workloads
QUICK_ROUNDS = {"many-small-mlp": 5, "few-cnn": 2}
START, END = "<!-- bench_users:start -->", "<!-- bench_users:end -->"


def scenario(workload: str, rounds: int) -> dict:
    from bench_engine import WORKLOADS

    raw = json.loads(json.dumps(WORKLOADS[workload]))
    raw["run"].update(rounds=rounds, checkpoint_every=rounds, name=f"bench-{workload}")
    return raw


def final_model_of(run_dir: Path) -> list[np.ndarray]:
    from fedsim.results import load_checkpoint

    last = max(run_dir.glob("checkpoints/round_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    return load_checkpoint(last)["model"]


def fedsim_samples(run_dir: Path) -> list[list[int]]:
    from fedsim.results import read_jsonl

    by_round: dict[int, list[int]] = {}
    for c in read_jsonl(run_dir / "clients.jsonl"):
        if c.get("status") == "ok" and c.get("round", 0) > 0:
            by_round.setdefault(int(c["round"]), []).append(int(c["client"]))
    return [sorted(by_round[r]) for r in sorted(by_round)]


# --------------------------------------------------------------------- the plain loop (and its replay)
def plain_loop(raw: dict, samples: list[list[int]] | None = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """Train like fedsim's FedAvg with a bare loop; ``samples``: the clients per round (default: the
    seeded sample fedsim's strategies draw). Returns the final weights and the samples used."""
    import torch

    from fedsim.config import scenario_from_dict
    from fedsim.data.federation import federation_of
    from fedsim.models import build_model
    from fedsim.rng import derive_seed, numpy_rng, torch_generator

    scen = scenario_from_dict(raw)
    d, c = scen.data, scen.client
    torch.set_num_threads(scen.run.threads)
    fed = federation_of(scen)
    model = build_model(scen.model, tuple(fed.input_shape), int(fed.num_classes),
                        derive_seed(scen.run.seed, "model-init"))
    data = {i: (torch.tensor(fed.dataset.x_train[idx], dtype=torch.float32), torch.tensor(fed.dataset.y_train[idx]))
            for i, idx in enumerate(fed.client_indices)}
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    m = max(int(np.floor(scen.strategy.fraction_train * d.num_clients)), scen.strategy.min_train_clients)
    used = []
    for rnd in range(1, scen.run.rounds + 1):
        drawn = numpy_rng(scen.run.seed, "sample", rnd).choice(d.num_clients, m, replace=False)
        chosen = samples[rnd - 1] if samples is not None else sorted(int(p) for p in drawn)
        used.append(list(chosen))
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in glob.items()}
        total = 0
        for pid in chosen:
            model.load_state_dict(glob)
            opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
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
            total += x.shape[0]
            for k, v in model.state_dict().items():
                acc[k] += x.shape[0] * v.double()
        glob = {k: (v / total).to(glob[k].dtype) for k, v in acc.items()}
    return [v.numpy() for v in glob.values()], used


# --------------------------------------------------------------------- Flower's own Ray simulation
def flower_run(raw: dict, out: Path) -> None:
    """``run_simulation`` + Flower's ``FedAvg`` + a vanilla ClientApp (the plain loop's training)."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedsim.catalog import resolve
    from fedsim.config import scenario_from_dict
    from fedsim.engines.ray import backend_config_for
    from fedsim.server import ServerRuntime

    scen = resolve(scenario_from_dict(raw))
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        from fedsim.data.federation import federation_of
        from fedsim.models import build_model
        from fedsim.rng import torch_generator

        s = scenario_from_dict(raw)
        torch.set_num_threads(s.run.threads)
        fed = federation_of(s)  # cached per worker process
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        idx = fed.client_indices[pid]
        x = torch.tensor(fed.dataset.x_train[idx], dtype=torch.float32)
        y = torch.tensor(fed.dataset.y_train[idx], dtype=torch.long)
        model = build_model(s.model, tuple(fed.input_shape), int(fed.num_classes), 0)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        c = s.client
        opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        g = torch_generator(s.run.seed, "train", rnd, pid)
        for _ in range(c.epochs):
            order = torch.randperm(len(y), generator=g)
            for st in range(0, len(y), c.batch_size):
                i = order[st:st + c.batch_size]
                loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(y), "partition-id": pid})}),
                       reply_to=msg)

    server = ServerApp()
    samples: list[list[int]] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        rt = ServerRuntime(scen)
        real = grid.send_and_receive

        def recording(messages, *, timeout=None):  # which partitions trained, per round
            replies = list(real(messages, timeout=timeout))
            pids = [int(r.content["metrics"]["partition-id"]) for r in replies if not r.has_error()
                    and r.metadata.message_type == "train"]
            if pids:
                samples.append(sorted(pids))
            return replies

        grid.send_and_receive = recording
        res = FedAvg(fraction_train=scen.strategy.fraction_train, min_train_nodes=scen.strategy.min_train_clients,
                     fraction_evaluate=0.0, min_available_nodes=scen.data.num_clients).start(
            grid=grid, initial_arrays=rt.initial_arrays(), num_rounds=scen.run.rounds,
            evaluate_fn=lambda rnd, arrays: (MetricRecord(rt.evaluate(arrays))  # as fedsim: first and last
                                             if rnd in (0, scen.run.rounds) else None))
        np.savez(out / "final.npz", *[a.numpy() for a in res.arrays.values()])

    run_simulation(server_app=server, client_app=client, num_supernodes=scen.data.num_clients,
                   backend_config=backend_config_for(scen))
    (out / "samples.json").write_text(json.dumps(samples))


# --------------------------------------------------------------------- timing one process
def timed(cmd: list[str], cwd: Path) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024}


def run_row(row: str, raw: dict, work: Path) -> tuple[dict, list[np.ndarray], list[list[int]]]:
    import tomli_w

    work.mkdir(parents=True)
    toml = work / "scenario.toml"
    toml.write_text(tomli_w.dumps(raw))
    py, me = sys.executable, str(Path(__file__).resolve())
    if row in ("plain", "flower"):
        fig = timed([py, me, "--worker", row, "--scenario", str(toml), "--out", str(work)], ROOT)
        with np.load(work / "final.npz") as z:
            model = [z[f"arr_{i}"] for i in range(len(z.files))]
        return fig, model, json.loads((work / "samples.json").read_text())
    fedsim = str(Path(py).with_name("fedsim"))
    extra = {"default": [], "vectorised": ["--set", "run.vectorize=true"], "ray": ["--engine", "ray"]}[row]
    fig = timed([fedsim, "run", str(toml), "--out", str(work / "run"), "--quiet", *extra], ROOT)
    return fig, final_model_of(work / "run"), fedsim_samples(work / "run")


def worker(kind: str, toml: Path, out: Path) -> None:
    import tomllib

    raw = tomllib.loads(toml.read_text())
    if kind == "plain":
        model, samples = plain_loop(raw)
        np.savez(out / "final.npz", *model)
        (out / "samples.json").write_text(json.dumps(samples))
    else:
        flower_run(raw, out)


# --------------------------------------------------------------------- the table
def measure(workloads: dict[str, int], rows: list[str], repeats: int, done=lambda results: None) -> dict:
    """Time every row on every workload; ``done(results)`` after each workload (partial results survive)."""
    results: dict = {}
    replays: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rounds in workloads.items():
            raw = scenario(name, rounds)
            figs: dict[str, list[dict]] = {r: [] for r in rows}
            diffs: dict[str, float] = {}
            for rep in range(repeats):  # rows interleaved, so that each repeat shares the load
                for row in rows:
                    try:
                        fig, model, samples = run_row(row, raw, Path(tmp) / f"{name}-{row}-{rep}")
                    except RuntimeError as err:  # one failing row (e.g. Ray) must not lose the others
                        print(f"  {name} {row}: FAILED {err}", file=sys.stderr, flush=True)
                        continue
                    fig["load"] = os.getloadavg()[0]
                    figs[row].append(fig)
                    key = (name, json.dumps(samples))
                    if key not in replays:
                        replays[key] = plain_loop(raw, samples)[0]
                    diffs[row] = max(diffs.get(row, 0.0), max(float(np.abs(a.astype(np.float64) - b).max())
                                                              for a, b in zip(model, replays[key])))
                    print(f"  {name} {row:10s} repeat {rep + 1}: {fig['wall_s']:7.2f} s wall, {fig['cpu_s']:7.2f} s "
                          f"CPU, {fig['rss_mb']:6.0f} MB, load {fig['load']:.1f}", file=sys.stderr, flush=True)
            results[name] = {"rounds": rounds, "rows": {
                r: {"wall_s": statistics.median(f["wall_s"] for f in figs[r]),
                    "cpu_s": statistics.median(f["cpu_s"] for f in figs[r]),
                    "rss_mb": max(f["rss_mb"] for f in figs[r]), "max_weight_diff": diffs[r],
                    "walls": [round(f["wall_s"], 2) for f in figs[r]],
                    "load": statistics.median(f["load"] for f in figs[r])} for r in rows if figs[r]}}
            done(results)
    return results


def table(results: dict, repeats: int) -> str:
    lines = [f"| workload | row | wall s (median of {repeats}) | wall ratio to plain | CPU s | CPU ratio | "
             "peak RSS MB | max weight diff to plain replay | load (1-min) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        rows = res["rows"]
        base = rows.get("plain")
        for r, f in rows.items():
            ratio = f"{f['wall_s'] / base['wall_s']:.2f}×" if base else "–"
            cpu_ratio = f"{f['cpu_s'] / base['cpu_s']:.2f}×" if base else "–"
            walls = ", ".join(map(str, f["walls"]))
            lines.append(f"| {name} ({res['rounds']} rounds) | {r} | {f['wall_s']:.2f} ({walls}) | {ratio} | "
                         f"{f['cpu_s']:.2f} | {cpu_ratio} | {f['rss_mb']:.0f} | {f['max_weight_diff']:.2g} | {f['load']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        rows = list(res["rows"])
        ax.bar(rows, [res["rows"][r]["wall_s"] for r in rows], label="wall")
        ax.bar(rows, [res["rows"][r]["cpu_s"] for r in rows], width=0.4, label="CPU")
        ax.set_title(f"{name}, {res['rounds']} rounds (whole process)")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_results(text: str) -> None:
    path = HERE / "RESULTS.md"
    doc = path.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in doc and END in doc:
        doc = doc[:doc.index(START)] + block + doc[doc.index(END) + len(END):]
    else:
        head, sep, rest = doc.partition("\n## ")
        doc = f"{head}\n{block}\n{sep}{rest}" if sep else f"{doc}\n{block}\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, 1 repeat (a smoke run of the table)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--only", choices=sorted(ROUNDS))
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--worker", choices=["plain", "flower"], help=argparse.SUPPRESS)
    ap.add_argument("--scenario", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.scenario, args.out)
    rows = [r for r in args.rows.split(",") if r]
    if unknown := set(rows) - set(ROWS):
        ap.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    repeats = args.repeats or (1 if args.quick else 3)
    workloads = {k: v for k, v in (QUICK_ROUNDS if args.quick else ROUNDS).items() if args.only in (None, k)}
    load0 = os.getloadavg()
    cmd = "python bench/bench_users.py " + " ".join(sys.argv[1:])

    def emit(results: dict) -> None:
        text = (f"## `make bench`: whole processes, as a user runs them (`{cmd.strip()}`)\n\n"
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average "
                f"{load0[0]:.1f} at the start / {os.getloadavg()[0]:.1f} now (1-min); CPU s: the process and "
                f"its reaped children; peak RSS: the largest single process.\n\n{table(results, repeats)}\n\n"
                "![bench](bench_users.png)\n")
        print(text, flush=True)
        if not args.no_write:
            write_results(text)
            plot(results, HERE / "bench_users.png")
            (HERE / "bench_users.json").write_text(json.dumps(results, indent=2))

    measure(workloads, rows, repeats, done=emit)


if __name__ == "__main__":
    main()
