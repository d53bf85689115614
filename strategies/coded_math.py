"""Gradient coding: exact full gradients from any ``n - s`` of ``n`` workers (pure NumPy).

Reference
---------
Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed
Learning", ICML 2017 (arXiv 1612.03301); code rashisht1/gradient_coding (``src/util.py::getB``,
``src/coded.py``). Spec: ``server-algorithms.md`` section 4a.

The data is split into ``n`` partitions with partial gradients ``g_1..g_n``. Worker ``i`` sends
``y_i = sum_j B_ij g_j``; ``B`` is supported on the ``s + 1`` partitions the worker holds. For every
survivor set ``F`` of ``n - s`` workers there is ``a_F`` with ``a_F^T B_F = 1^T``, so
``sum_j g_j = a_F^T Y_F``.

* Fractional repetition (``(s+1) | n``): groups of ``s + 1`` workers hold the same ``s + 1``
  partitions and send their plain sum; ``B`` is block diagonal with all-ones blocks.
* Cyclic repetition: worker ``i`` holds partitions ``i, ..., i+s (mod n)``. As in the reference
  ``getB``: draw ``H`` (``s x n``, Gaussian, last column minus the sum of the others so that
  ``H 1 = 0``), set ``B_ii = 1`` and solve ``H[:, S_i \\ {i}] v = -H[:, i]`` for the other entries.
  Every row then lies in ``null(H)`` (dimension ``n - s``, containing ``1``), and generically any
  ``n - s`` rows span it.

Decoding solves ``B_F^T a = 1`` by least squares (as the reference does, plus one step of iterative
refinement: random cyclic codes get ill-conditioned as ``n`` and ``s`` grow) and then CHECKS the
residual: a survivor set that cannot produce the full gradient raises
:class:`~fedsim.errors.AggregationError` instead of returning a wrong gradient (the reference does
not check). Sets with more than ``s`` stragglers are attempted too: fractional repetition still
decodes when every group has a survivor.

Conditioning (exactness in finite precision). A message ``y_i`` carried with unit round-off ``u``
has an error up to ``u sum_j |B_ij g_j|``; the decoded sum then errs by up to
``u * A_F * sum_j |g_j|`` with the *amplification* ``A_F = max_j sum_{i in F} |a_i B_ij|``
(:func:`decoding_amplification`). ``A_F = 1`` for fractional repetition and ``s = 0`` (plain
sums), but random cyclic codes reach ``10^2``-``10^7`` (measured: n = 10, s = 2 gives 100 to 7.6e4
over 30 draws; n = 16, s = 4 gives 1.5e4 to 2.5e7), so float32 messages are NOT exact. Even one
float32 rounding of a plain sum (fractional repetition) is magnified by gradient descent itself:
measured 2.1e-5 from uncoded GD after 30 steps (10 workers, Dirichlet 0.3, seed 4). Coded messages
therefore travel in float64 unless each is a single piece gradient (:func:`message_dtype`). The
cyclic construction draws ``candidates`` codes and keeps the best conditioned one
(:func:`code_amplification`: every survivor set when there are at most ``max_sets`` of them, a
seeded sample otherwise), and decoding refuses a survivor set whose amplification exceeds
``MAX_AMPLIFICATION`` = 2^24 (float64 messages then still decode to 2^-29 of ``sum_j |g_j|``,
well under float32 round-off of the plain sum).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedsim.errors import AggregationError, ConfigError

__all__ = [
    "MAX_AMPLIFICATION",
    "GradientCode",
    "code_amplification",
    "cyclic_repetition_code",
    "decode",
    "decoding_amplification",
    "decoding_vector",
    "encode",
    "fractional_repetition_code",
    "make_code",
    "message_dtype",
]

DECODE_TOL = 1e-8
#: largest decoding amplification accepted (float64 messages: error <= 2^-29 sum_j |g_j|)
MAX_AMPLIFICATION = float(2 ** 24)


def _check_ns(n: int, s: int) -> None:
    if n < 1:
        raise ConfigError("gradient_coding.n", f"needs at least one worker, got n={n}")
    if not 0 <= s < n:
        raise ConfigError("gradient_coding.s", f"must satisfy 0 <= s < n, got s={s}, n={n}",
                          "each partition is replicated on s + 1 workers, so s can be at most n - 1")


def fractional_repetition_code(n: int, s: int) -> np.ndarray:
    """``B`` for fractional repetition: block diagonal with ``(s+1) x (s+1)`` all-ones blocks."""
    _check_ns(n, s)
    if n % (s + 1) != 0:
        raise ConfigError("gradient_coding.s", f"fractional repetition needs (s+1) | n, got n={n}, s={s}",
                          "use the cyclic scheme, or choose s so that s + 1 divides n")
    return np.kron(np.eye(n // (s + 1)), np.ones((s + 1, s + 1)))


def cyclic_repetition_code(n: int, s: int, rng: np.random.Generator, max_tries: int = 20) -> np.ndarray:
    """``B`` for cyclic repetition (reference construction ``getB``); worker ``i`` holds ``i..i+s mod n``.

    A fresh ``H`` is drawn while a row solve is singular or produces non-finite entries.
    """
    _check_ns(n, s)
    if s == 0:
        return np.eye(n)
    for _ in range(max_tries):
        head = rng.standard_normal((s, n - 1))
        H = np.hstack([head, -head.sum(axis=1, keepdims=True)])
        B = np.zeros((n, n))
        try:
            for i in range(n):
                others = [(i + t) % n for t in range(1, s + 1)]
                B[i, i] = 1.0
                B[i, others] = np.linalg.solve(H[:, others], -H[:, i])
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(B)):
            return B
    raise AggregationError(f"could not build a cyclic gradient code for n={n}, s={s}",
                           "retry with another seed")


def _support(B: np.ndarray, i: int) -> np.ndarray:
    return np.flatnonzero(B[i] != 0)


def encode(B: np.ndarray, worker: int, partition_grads: Sequence[np.ndarray] | Mapping[int, np.ndarray]) -> np.ndarray:
    """Worker ``worker``'s message ``sum_j B_ij g_j`` over the partitions it holds.

    ``partition_grads`` is either all ``n`` partial gradients or a mapping ``partition -> gradient``
    holding (at least) the worker's own partitions.
    """
    support = _support(B, worker)
    missing = [int(j) for j in support if (j not in partition_grads if isinstance(partition_grads, Mapping)
                                           else j >= len(partition_grads))]
    if missing:
        raise AggregationError(f"worker {worker} lacks partial gradients for partitions {missing}",
                               "a worker must compute every partition it holds")
    out = None
    for j in support:
        term = B[worker, j] * np.asarray(partition_grads[int(j)], dtype=np.float64)
        out = term if out is None else out + term
    return out


def decoding_vector(B: np.ndarray, survivors: Sequence[int], tol: float = DECODE_TOL,
                    max_amplification: float = MAX_AMPLIFICATION) -> np.ndarray:
    """``a`` with ``a^T B[survivors] = 1^T`` (least squares + residual and conditioning checks).

    Raises
    ------
    AggregationError
        When the survivors cannot recover the full gradient (too many stragglers), or only with a
        decoding amplification above ``max_amplification`` (see the module docstring).
    """
    survivors = [int(i) for i in survivors]
    n = B.shape[1]
    if len(set(survivors)) != len(survivors):
        raise AggregationError(f"duplicate workers in survivor set {survivors}", None)
    if not survivors:
        raise AggregationError("no worker returned a coded gradient", "wait for at least n - s workers")
    BF = B[survivors, :]
    a, *_ = np.linalg.lstsq(BF.T, np.ones(n), rcond=None)
    a = a + np.linalg.lstsq(BF.T, np.ones(n) - BF.T @ a, rcond=None)[0]   # one refinement step
    residual = np.max(np.abs(a @ BF - 1.0))
    scale = 1.0 + np.max(np.abs(a)) * np.max(np.abs(BF))
    if not np.isfinite(residual) or residual > tol * scale:
        raise AggregationError(
            f"gradient code cannot decode from workers {survivors} (residual {residual:.2e}): "
            f"{n - len(survivors)} stragglers",
            "wait for more workers (a code built for s stragglers needs any n - s of them)")
    amp = decoding_amplification(B, survivors, a)
    if amp > max_amplification:
        raise AggregationError(
            f"gradient code decodes from workers {survivors} only with amplification {amp:.3g} > "
            f"{max_amplification:.3g}: the decoded gradient would not be exact in float64",
            "use scheme = \"fr\" (amplification 1), a smaller s, or another run.seed (another cyclic code)")
    return a


def decoding_amplification(B: np.ndarray, survivors: Sequence[int], a: np.ndarray) -> float:
    """``A_F = max_j sum_{i in F} |a_i B_ij|``: how much decoding magnifies message round-off.

    A message error ``|e_i| <= u sum_j |B_ij g_j|`` gives a decoded error ``<= u A_F sum_j |g_j|``.
    """
    BF = np.abs(np.asarray(B, dtype=np.float64)[[int(i) for i in survivors], :])
    return float(np.max(np.abs(a) @ BF)) if BF.size else 0.0


def code_amplification(B: np.ndarray, s: int, rng: np.random.Generator | None = None,
                       max_sets: int = 500) -> tuple[float, bool]:
    """Worst decoding amplification over the survivor sets of ``n - s`` workers.

    Returns ``(worst, exhaustive)``: every set when there are at most ``max_sets`` of them
    (``exhaustive = True``), else ``max_sets`` sets drawn with ``rng``; ``inf`` when a set cannot
    decode. The sets are solved together (batched normal equations, falling back to the batched
    pseudo-inverse, i.e. the minimum-norm ``a`` of :func:`decoding_vector`, where those are
    singular or inaccurate).
    """
    B = np.asarray(B, dtype=np.float64)
    n = B.shape[0]
    if math.comb(n, s) <= max_sets:
        sets, exhaustive = np.array(list(itertools.combinations(range(n), n - s)), dtype=int), True
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        sets = np.sort(np.stack([rng.choice(n, n - s, replace=False) for _ in range(max_sets)]), axis=1)
        exhaustive = False
    with _one_blas_thread():          # many small solves: threads only contend (10x slower on a busy box)
        return _worst_amplification(B, sets), exhaustive


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits   # a dependency of scikit-learn
    except ImportError:                               # pragma: no cover - speed only
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _worst_amplification(B: np.ndarray, sets: np.ndarray) -> float:
    worst = 0.0
    for chunk in np.array_split(sets, max(1, len(sets) // 256)):
        BF = B[chunk]                                              # sets x (n - s) x n
        amp, ok = _batch_amplification(BF, normal=True)            # fast path: normal equations
        if not ok:
            amp, ok = _batch_amplification(BF, normal=False)       # SVD: slower, well conditioned
        if not ok:
            return math.inf
        worst = max(worst, float(amp.max()))
    return worst


def _batch_amplification(BF: np.ndarray, normal: bool) -> tuple[np.ndarray, bool]:
    """Amplification of each stacked ``B_F`` and whether every set decodes (residual check)."""
    with np.errstate(all="ignore"):
        try:
            if normal:     # B_F B_F^T a = B_F 1: the unique a when B_F has full row rank
                a = np.linalg.solve(BF @ BF.transpose(0, 2, 1), BF.sum(axis=2)[..., None])[..., 0]
            else:          # a^T = 1^T pinv(B_F): minimum-norm least squares, as decoding_vector
                a = np.linalg.pinv(BF).sum(axis=1)
        except np.linalg.LinAlgError:
            return np.empty(0), False
        residual = np.max(np.abs(np.einsum("sk,skn->sn", a, BF) - 1.0), axis=1)
        amp = np.max(np.einsum("sk,skn->sn", np.abs(a), np.abs(BF)), axis=1)
    ok = bool(np.all(np.isfinite(residual)) and np.all(residual <= DECODE_TOL * (1.0 + amp)))
    return amp, ok


def message_dtype(B: np.ndarray, precision: str = "float32") -> type:
    """The dtype coded messages travel in so that decoding equals the plain sum of the pieces.

    float32 only when the model is float32 and every message is ONE piece gradient with
    coefficient 1 (``s = 0``: uncoded GD), which float32 carries losslessly; float64 otherwise,
    even for plain sums (see the module docstring for the measured cost of one float32 rounding).
    """
    B = np.asarray(B)
    single = bool(np.all((B != 0).sum(axis=1) == 1) and np.all(B[B != 0] == 1.0))
    return np.float32 if precision == "float32" and single else np.float64


def decode(B: np.ndarray, survivors: Sequence[int], coded: Sequence[np.ndarray] | Mapping[int, np.ndarray],
           tol: float = DECODE_TOL) -> np.ndarray:
    """Full gradient ``sum_j g_j = sum_{i in F} a_i y_i``.

    ``coded`` is aligned with ``survivors`` (sequence) or a mapping ``worker -> y_worker``.
    """
    survivors = [int(i) for i in survivors]
    a = decoding_vector(B, survivors, tol)
    ys = [coded[i] for i in survivors] if isinstance(coded, Mapping) else list(coded)
    if len(ys) != len(survivors):
        raise AggregationError(f"{len(ys)} coded messages for {len(survivors)} survivors", None)
    out = np.zeros_like(np.asarray(ys[0], dtype=np.float64))
    for ai, y in zip(a, ys):
        out += ai * np.asarray(y, dtype=np.float64)
    return out


@dataclass(frozen=True, eq=False)
class GradientCode:
    """A gradient code: ``B`` plus the number of stragglers it is designed for.

    Attributes
    ----------
    B
        ``n x n`` encoding matrix (rows = workers, columns = partitions).
    s
        Designed number of stragglers: ANY ``n - s`` workers decode.
    scheme
        ``"fractional"``, ``"cyclic"`` or ``"custom"``.
    """

    B: np.ndarray
    s: int
    scheme: str = "custom"
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return int(self.B.shape[0])

    @property
    def load(self) -> float:
        """Normalised computation load per worker, ``(s + 1) / n``."""
        return (self.s + 1) / self.n

    def partitions_of(self, worker: int) -> list[int]:
        """Partitions worker ``worker`` must compute."""
        return [int(j) for j in _support(self.B, worker)]

    def encode(self, worker: int, partition_grads) -> np.ndarray:
        return encode(self.B, worker, partition_grads)

    def decoding_vector(self, survivors: Sequence[int]) -> np.ndarray:
        key = tuple(sorted(int(i) for i in survivors))
        if key not in self._cache:
            self._cache[key] = decoding_vector(self.B, key)
        a = self._cache[key]
        order = {w: k for k, w in enumerate(key)}
        return a[[order[int(i)] for i in survivors]]

    @property
    def amplification(self) -> float:
        """Worst decoding amplification over survivor sets of ``n - s`` (:func:`code_amplification`)."""
        if "amplification" not in self._cache:
            self._cache["amplification"] = code_amplification(self.B, self.s)[0]
        return self._cache["amplification"]

    def amplification_of(self, survivors: Sequence[int]) -> float:
        """The decoding amplification of one survivor set."""
        return decoding_amplification(self.B, survivors, self.decoding_vector(survivors))

    def decode(self, survivors: Sequence[int], coded) -> np.ndarray:
        survivors = [int(i) for i in survivors]
        a = self.decoding_vector(survivors)
        ys = [coded[i] for i in survivors] if isinstance(coded, Mapping) else list(coded)
        out = np.zeros_like(np.asarray(ys[0], dtype=np.float64))
        for ai, y in zip(a, ys):
            out += ai * np.asarray(y, dtype=np.float64)
        return out


def make_code(n: int, s: int, scheme: str = "cyclic", rng: np.random.Generator | None = None,
              candidates: int = 8, max_sets: int = 500) -> GradientCode:
    """Build a :class:`GradientCode` (``scheme`` = ``"cyclic"`` or ``"fractional"``).

    Cyclic: ``candidates`` codes are drawn with ``rng`` and the one with the smallest worst
    decoding amplification (:func:`code_amplification` with ``max_sets``) is kept; the figure is
    the code's ``amplification``.
    """
    if scheme == "fractional":
        return GradientCode(fractional_repetition_code(n, s), s, "fractional")
    if scheme == "cyclic":
        if rng is None:
            raise ConfigError("gradient_coding.seed", "the cyclic scheme needs a NumPy rng",
                              "pass fedsim.rng.numpy_rng(seed, 'gradient-code')")
        best: tuple[float, np.ndarray] | None = None
        for _ in range(max(1, candidates) if s > 0 else 1):
            B = cyclic_repetition_code(n, s, rng)
            amp = code_amplification(B, s, rng, max_sets)[0]
            if best is None or amp < best[0]:
                best = (amp, B)
        code = GradientCode(best[1], s, "cyclic")
        code._cache["amplification"] = best[0]
        return code
    raise ConfigError("gradient_coding.scheme", f"unknown scheme {scheme!r}",
                      "use 'cyclic' or 'fractional'")
