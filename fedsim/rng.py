"""Deterministic randomness from one root seed.

Every random stream is derived from ``(root_seed, *purpose)`` where the purpose is a tuple of
ints/strings such as ``("train", round, client)`` or ``("noise", round, "dp-fedavg")``. Results
therefore do not depend on engine, worker count or client order.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _word(part: object) -> int:
    if isinstance(part, (bool, np.bool_)):
        return int(part)
    if isinstance(part, (int, np.integer)):
        v = int(part)
        if v >= 0:
            return v
    digest = hashlib.blake2b(repr(part).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_sequence(root_seed: int, *purpose: object) -> np.random.SeedSequence:
    """SeedSequence for ``purpose`` under ``root_seed`` (strings hashed stably, not with ``hash``)."""
    return np.random.SeedSequence([_word(root_seed), *(_word(p) for p in purpose)])


def derive_seed(root_seed: int, *purpose: object) -> int:
    """A 63-bit integer seed for ``purpose`` (for torch generators and libraries taking ints)."""
    return int(seed_sequence(root_seed, *purpose).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def numpy_rng(root_seed: int, *purpose: object) -> np.random.Generator:
    """A NumPy ``Generator`` (PCG64) for ``purpose``."""
    return np.random.default_rng(seed_sequence(root_seed, *purpose))


def torch_generator(root_seed: int, *purpose: object, device: str = "cpu"):
    """A ``torch.Generator`` seeded for ``purpose``."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(root_seed, *purpose))
    return gen
