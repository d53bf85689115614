"""Fingerprint every built-in scenario: final metrics and the final model's checksum.

A refactoring must leave these bit-identical (same scenario + seed → same numbers). Run it before
and after a change and compare::

    python bench/scenario_fingerprint.py --save before.json        # on the old commit
    python bench/scenario_fingerprint.py --compare before.json     # on the new one (exit 1 on a change)

``bench/fingerprints.json`` holds the fingerprints of the commit recorded in its ``commit`` field.
Each scenario runs on the local engine with ``run.rounds`` capped (``--rounds``, default 4) so the
whole set takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TIMING_KEYS = ("wall_s",)


def fingerprint(path: Path, rounds: int) -> dict:
    from fedsim.config import load_scenario
    from fedsim.engines.local import run_local
    from fedsim.results import load_checkpoint, read_jsonl

    try:  # the resolver step exists from the architecture refactoring on
        from fedsim.catalog import resolve
    except ImportError:  # pragma: no cover - the pre-refactoring tree
        resolve = None
    scenario = load_scenario(path)
    n = min(scenario.run.rounds, rounds)
    scenario = load_scenario(path, [f"run.rounds={n}", "run.progress=false", "run.checkpoint_every=1"])
    if resolve is not None:
        resolve(scenario)
    with tempfile.TemporaryDirectory() as out:
        summary = run_local(scenario, out)
        rows = read_jsonl(Path(out) / "metrics.jsonl")
        clients = read_jsonl(Path(out) / "clients.jsonl")
        ckpt = sorted((Path(out) / "checkpoints").glob("round_*.npz"))[-1]
        model = load_checkpoint(ckpt)["model"]
        privacy = read_jsonl(Path(out) / "privacy.jsonl") if (Path(out) / "privacy.jsonl").exists() else []
    digest = hashlib.sha256()
    for a in model:
        digest.update(np.ascontiguousarray(a).tobytes())
    return {"rounds": n, "status": summary["status"],
            "metrics": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows],
            "clients": [{k: v for k, v in c.items() if k not in TIMING_KEYS} for c in clients],
            "privacy": privacy, "model_sha256": digest.hexdigest()}


def _same(ref, new, added: set, where: str) -> bool:
    """``new`` equals ``ref`` on every key ``ref`` has (keys only in ``new`` go to ``added``)."""
    if isinstance(ref, dict) and isinstance(new, dict):
        added.update(f"{where.split('.')[-1]}:{k}" for k in set(new) - set(ref))
        return all(k in new and _same(ref[k], new[k], added, where) for k in ref)
    if isinstance(ref, list) and isinstance(new, list):
        return len(ref) == len(new) and all(_same(a, b, added, where) for a, b in zip(ref, new))
    return ref == new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--only", nargs="*", default=None, help="scenario stems to run")
    args = ap.parse_args()
    from fedsim.catalog import builtin_scenarios

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "rounds_cap": args.rounds, "scenarios": {}}
    for path in builtin_scenarios():
        if args.only and path.stem not in args.only:
            continue
        out["scenarios"][path.stem] = fingerprint(path, args.rounds)
        print(f"{path.stem:24s} {out['scenarios'][path.stem]['model_sha256'][:16]}", flush=True)
    if args.save:
        args.save.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    if args.compare:
        ref = json.loads(args.compare.read_text())["scenarios"]
        bad, added = [], set()
        for name, fp in out["scenarios"].items():
            if name not in ref:
                print(f"{name}: no reference")
                continue
            for part in ("status", "metrics", "clients", "privacy", "model_sha256"):
                if not _same(ref[name][part], fp[part], added, f"{name}.{part}"):
                    bad.append(f"{name}: {part} differs")
        if added:
            print("keys added since the reference (values of every reference key compared):",
                  ", ".join(sorted(added)))
        print("\n".join(bad) or f"all {len(out['scenarios'])} scenarios identical to {args.compare}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
