"""Simulated runtime of uncoded GD, gradient coding and sequential gradient coding, over seeds.

    python bench/compare_coded.py                                  # bursty stragglers (the scenario's)
    python bench/compare_coded.py --stragglers gilbert_elliott     # stragglers that break (B, W, lam)
    python bench/compare_coded.py --seeds 0 1 2 3 4 --jobs 60
    python bench/compare_coded.py --offline                        # the clock alone, no training
    python bench/compare_coded.py --exactness --seeds 0 1 2 3 4    # GC == uncoded GD in float32?

Every variant runs ``scenarios/coded_stragglers.toml`` through the local engine with the same
seed, hence the same straggler pattern and time jitter (common random numbers), and computes the
same number of full gradients (``--jobs``): GC variants run ``jobs`` rounds, a sequential scheme
with delay T runs ``jobs + T`` rounds (the last T only finish pending jobs). The table gives the
design load per worker (fraction of the data computed per round), the total simulated time, the
speed-up over uncoded GD, the number of GD steps behind the final model, its test accuracy, and
the largest difference between the run's parameters (float64, every model replica) and uncoded GD
of the same seed after as many steps.

Where the math says "identical": uncoded GD and GC apply the exact full gradient every round;
sequential GC with ``jobs = "interleaved"`` (the paper's concurrent-models use) trains T + 1
replicas round-robin, each by exact GD (one step every T + 1 rounds), so every replica equals
uncoded GD after as many steps (differences ~1e-13). With ``jobs = "delayed"`` one model takes job
t's gradient when it is decoded (delay up to T): different math (GD with stale gradients), so the
difference is large and accuracy may suffer at this learning rate.

``--exactness`` checks the default precision (float32 model) instead: 10 workers on Dirichlet(0.3)
shards, bursty stragglers never above s = 2, 30 steps; per seed, the largest parameter difference
between GC (cyclic and fractional repetition) and uncoded GD, with the code's worst decoding
amplification and the bits per message coordinate (issue 12: float32 messages of a cyclic code
ended up to 8.5e-5 away; they now travel in float64). Fractional repetition runs with s = 1 (it
needs (s + 1) | 10) and waits for the second straggler when there are two.

``--offline`` skips training: :func:`simulate_wallclock` replays the scenario's straggler model and
time model through each scheme's waiting rule (uncoded waits for every worker, GC for the fastest
``n - s``, sequential GC until ``(1 + mu) x fastest`` unless the pattern breaks its model) and
prints the total simulated time per scheme. ``tests/strategies/test_stragglers_math.py`` tests it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedsim.errors import ConfigError
from fedsim.rng import numpy_rng
from fedsim.strategies.sequential_coded_math import MultiplexedSGC, SelectiveRepeatSGC
from fedsim.strategies.stragglers_math import ComputeTimeModel, draw_stragglers, stragglers_from_times

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "coded_stragglers.toml"


def variants(B: int, W: int, lam: int, s: int) -> list[tuple[str, list[str], int]]:
    """``(label, overrides, delay T)``."""
    return [
        ("uncoded GD (s = 0)", ["strategy.s=0"], 0),
        (f"GC cyclic (s = {s})", [f"strategy.s={s}", 'strategy.scheme="cyclic"'], 0),
        (f"GC fractional repetition (s = {s})", [f"strategy.s={s}", 'strategy.scheme="fr"'], 0),
        (f"SR-SGC (B={B}, W={W}, λ={lam}), interleaved", ['strategy.sequential="sr-sgc"'], B),
        (f"M-SGC (B={B}, W={W}, λ={lam}), interleaved", ['strategy.sequential="m-sgc"'], W - 2 + B),
        (f"SR-SGC (B={B}, W={W}, λ={lam}), delayed", ['strategy.sequential="sr-sgc"', 'strategy.jobs="delayed"'], B),
        (f"M-SGC (B={B}, W={W}, λ={lam}), delayed", ['strategy.sequential="m-sgc"', 'strategy.jobs="delayed"'],
         W - 2 + B),
    ]


def _replicas(state: dict) -> list[np.ndarray]:
    """Flat float64 parameters of every model replica in a checkpoint's strategy state."""
    reps: dict[int, dict[int, np.ndarray]] = {}
    for key, a in state.items():
        parts = key.split(".")
        if parts[0] == "replica":
            reps.setdefault(int(parts[1]), {})[int(parts[2])] = np.ravel(a).astype(np.float64)
    return [np.concatenate([d[i] for i in sorted(d)]) for _, d in sorted(reps.items())]


def run_one(sets: list[str], rounds: int, seed: int, every_round: bool = False) -> dict:
    from fedsim.config import load_scenario
    from fedsim.engines.local import run_local
    from fedsim.results import load_checkpoint, read_jsonl

    scen = load_scenario(SCENARIO, [*sets, f"run.rounds={rounds}", f"run.seed={seed}", "run.progress=false",
                                    f"run.checkpoint_every={1 if every_round else rounds}",
                                    f"run.eval_every={rounds}"])
    with tempfile.TemporaryDirectory() as out:
        summary = run_local(scen, out)
        if summary["status"] != "completed":
            raise SystemExit(f"{sets} seed={seed}: {summary['status']} {summary.get('error')}")
        rows = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if r["round"] > 0]
        ckpts = sorted((Path(out) / "checkpoints").glob("round_*.npz"))
        states = [load_checkpoint(c)["strategy"] for c in ckpts]
    final = states[-1]
    return {"time": rows[-1]["sim-total-time"], "acc": rows[-1]["test_accuracy"],
            "load": rows[0]["nominal-load"], "steps": rows[-1]["model-steps"],
            "replicas": _replicas(final), "replica_steps": [int(v) for v in np.ravel(final["steps"])],
            "trajectory": [_replicas(st)[0] for st in states] if every_round else None,
            "jobs": int(sum(r.get("jobs-decoded", r.get("decoded", 0)) for r in rows)),
            "waited": int(sum(r.get("waited-for-all", 0) + (r.get("waited-stragglers", 0) > 0) for r in rows)),
            "failed": int(sum(r.get("aggregation-failed", 0) for r in rows)),
            "amplification": rows[-1].get("code-amplification", float("nan")),
            "bits": rows[-1].get("transport-bits", 0)}


def gd_gap(run: dict, uncoded: dict) -> float:
    """Largest |param difference| between every replica and uncoded GD after as many steps."""
    gaps = [float(np.max(np.abs(p - uncoded["trajectory"][k - 1])))
            for p, k in zip(run["replicas"], run["replica_steps"]) if k > 0]
    return max(gaps) if gaps else float("nan")


def fmt(values: list[float], digits: int = 2) -> str:
    sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# offline analysis: the simulated clock alone
def uncoded_round_times(times: np.ndarray) -> np.ndarray:
    """Uncoded: the master waits for every worker."""
    return np.asarray(times).max(axis=-1)


def gc_round_times(times: np.ndarray, s: int) -> np.ndarray:
    """Gradient coding: the master waits for the fastest ``n - s`` workers."""
    times = np.asarray(times)
    n = times.shape[-1]
    return np.sort(times, axis=-1)[..., n - s - 1]


def sequential_round_times(times: np.ndarray, scheduler, mu: float) -> np.ndarray:
    """Drive a sequential-GC scheduler with stragglers detected from ``times`` (the ``mu`` rule).

    A round lasts ``min((1 + mu) * fastest, slowest)`` when the detected pattern follows the
    scheme's model, and ``slowest`` when the scheduler waited for everyone.
    """
    times = np.asarray(times, dtype=np.float64)
    out = np.empty(times.shape[0])
    for r, row in enumerate(times):
        report = scheduler.step(stragglers_from_times(row, mu))
        out[r] = row.max() if report.waited_for_all else min((1.0 + mu) * row.min(), row.max())
    return out


def simulate_wallclock(rng: np.random.Generator, pattern: np.ndarray, model: ComputeTimeModel, s: int,
                       B: int, W: int, lam: int, mu: float = 0.1, num_jobs: int | None = None) -> dict:
    """Total simulated wall-clock to finish ``num_jobs`` gradients under each scheme.

    ``pattern`` (``(rounds, n)``) says who is slowed down; it must cover ``num_jobs + W - 2 + B``
    rounds (the longest pipeline). The noise is shared between schemes (common random numbers).
    Returns ``{scheme: {"round_times": array, "total": float, "load": float}}`` for ``"uncoded"``,
    ``"gc"``, ``"sr-sgc"`` (when ``B | (W - 1)``) and ``"m-sgc"``.
    """
    pattern = np.asarray(pattern, dtype=bool)
    n = pattern.shape[1]
    T_max = W - 2 + B
    jobs = num_jobs if num_jobs is not None else pattern.shape[0] - T_max
    sr = SelectiveRepeatSGC(n, B, W, lam, num_jobs=jobs) if (W - 1) % B == 0 else None
    ms = MultiplexedSGC(n, B, W, lam, num_jobs=jobs)
    if pattern.shape[0] < jobs + ms.T:
        raise ConfigError("stragglers.rounds", f"pattern has {pattern.shape[0]} rounds, need {jobs + ms.T}")
    noise = model.noise(rng, pattern.shape[0], n)
    result = {}
    t = model.times(1.0 / n, pattern[:jobs], noise[:jobs])
    result["uncoded"] = {"round_times": uncoded_round_times(t), "load": 1.0 / n}
    t = model.times((s + 1) / n, pattern[:jobs], noise[:jobs])
    result["gc"] = {"round_times": gc_round_times(t, s), "load": (s + 1) / n}
    for name, sched in (("sr-sgc", sr), ("m-sgc", ms)):
        if sched is None:
            continue
        rounds = jobs + sched.T
        t = model.times(sched.load, pattern[:rounds], noise[:rounds])
        result[name] = {"round_times": sequential_round_times(t, sched, mu), "load": sched.load}
    for v in result.values():
        v["total"] = float(v["round_times"].sum())
    return result


def offline(options: dict, n: int, jobs: int, seeds: list[int]) -> None:
    """Print :func:`simulate_wallclock`'s total simulated time per scheme for the scenario's options."""
    o = {"B": 1, "W": 3, "lam": 1, "s": 1, "mu": 0.1, "stragglers": "bernoulli", **options}
    B, W, lam = int(o["B"]), int(o["W"]), int(o["lam"])
    model = ComputeTimeModel(*(float(o.get(k, d)) for k, d in
                               (("base_time", 1.0), ("jitter", 0.05), ("straggler_delay", 1.0), ("overhead", 0.0))))
    params = {k: o[k] for k in ("p", "p_good_to_bad", "p_bad_to_good", "p_start", "p_continue") if k in o}
    runs = []
    for seed in seeds:
        pattern = draw_stragglers(str(o["stragglers"]), numpy_rng(seed, "coded-stragglers", o["stragglers"]), n,
                                  jobs + W - 2 + B, B=B, W=W, lam=lam, **params)
        runs.append(simulate_wallclock(numpy_rng(seed, "coded-time"), pattern, model, s=int(o["s"]), B=B, W=W,
                                       lam=lam, mu=float(o["mu"]), num_jobs=jobs))
    print(f"\nOffline clock: {n} workers, {jobs} gradient jobs, stragglers = {o['stragglers']}, seeds {seeds}.\n")
    print("| scheme | load / worker | simulated time (s) | speed-up vs uncoded |")
    print("|---|---|---|---|")
    for name in runs[0]:
        speed = [r["uncoded"]["total"] / r[name]["total"] for r in runs]
        print(f"| {name} | {runs[0][name]['load']:.3f} | {fmt([r[name]['total'] for r in runs])} | {fmt(speed)}× |")


EXACT_SETS = ['strategy.precision="float32"', "data.num_clients=10", 'data.partitioner="dirichlet"',
              "data.partition.alpha=0.3", "data.partition.min_partition_size=5", 'strategy.stragglers="bursty"',
              "strategy.B=1", "strategy.W=2", "strategy.lam=2", "strategy.p_start=0.5"]


def exactness(seeds: list[int], steps: int = 30) -> None:
    """Print, per seed, the max |param diff| of GD with gradient coding vs uncoded GD (float32 model)."""
    print(f"\nDefault precision (float32 model): 10 workers, Dirichlet 0.3, bursty stragglers <= s = 2, {steps} "
          "steps.\n")
    print("| seed | scheme | code amplification | message bits | max abs param diff vs uncoded GD |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        ref = run_one([*EXACT_SETS, "strategy.s=0"], steps, seed)["replicas"][0]
        for scheme, s in (("cyclic", 2), ("fr", 1)):          # fractional repetition needs (s + 1) | 10
            run = run_one([*EXACT_SETS, f"strategy.s={s}", f'strategy.scheme="{scheme}"'], steps, seed)
            print(f"| {seed} | {scheme}, s = {s} | {run['amplification']:.3g} | {run['bits']} | "
                  f"{float(np.max(np.abs(run['replicas'][0] - ref))):.1e} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=40, help="full gradients (GD steps) per run")
    ap.add_argument("--stragglers", default="bursty", choices=["bursty", "gilbert_elliott", "bernoulli"])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra scenario override")
    ap.add_argument("--offline", action="store_true", help="the simulated clock alone (no training)")
    ap.add_argument("--exactness", action="store_true", help="GC vs uncoded GD in the default precision")
    args = ap.parse_args(argv)
    from fedsim.config import load_scenario

    if args.exactness:
        exactness(args.seeds)
        return 0

    base = [f'strategy.stragglers="{args.stragglers}"', *args.sets]
    scen = load_scenario(SCENARIO, base)
    st = scen.strategy.options()
    if args.offline:
        offline(st, scen.data.num_clients, args.jobs, args.seeds)
        return 0
    B, W, lam, s = int(st.get("B", 1)), int(st.get("W", 3)), int(st.get("lam", 1)), int(st.get("s", 1))
    table = []
    for label, sets, T in variants(B, W, lam, s):
        runs = [run_one([*base, *sets], args.jobs + T, seed, every_round=not table) for seed in args.seeds]
        table.append((label, T, runs))
        print(f"  {label}: times {[round(r['time'], 2) for r in runs]}", file=sys.stderr, flush=True)
    ref = table[0][2]
    print(f"\nScenario `{SCENARIO.relative_to(ROOT)}`, stragglers = {args.stragglers} {' '.join(args.sets)}; "
          f"{args.jobs} gradient jobs; seeds {args.seeds}; local engine.\n")
    print("| scheme | delay T | load / worker | simulated time (s) | speed-up vs uncoded | GD steps of final model "
          "| final test accuracy | max abs param diff vs uncoded GD after as many steps "
          "| rounds that waited for stragglers / skipped |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, T, runs in table:
        speed = [u["time"] / r["time"] for u, r in zip(ref, runs)]
        gap = max(gd_gap(r, u) for u, r in zip(ref, runs))
        print(f"| {label} | {T} | {runs[0]['load']:.3f} | {fmt([r['time'] for r in runs])} | {fmt(speed)}× | "
              f"{runs[0]['steps']} | {fmt([r['acc'] for r in runs], 3)} | {gap:.1e} | "
              f"{sum(r['waited'] for r in runs)} / {sum(r['failed'] for r in runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
