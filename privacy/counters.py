"""Continual-release counters: private prefix sums S_t = Σ_{τ≤t} x_τ of a stream, released at every t.

Three mechanisms (registry :data:`COUNTERS`), each calibrated to ρ-zCDP for one record of ℓ2 norm
≤ C (``sensitivity``), for scalar or vector streams, with an exact per-coordinate variance
``theoretical_variance(t)``:

* ``"tree"`` -- binary tree mechanism (Dwork, Naor, Pitassi, Rothblum 2010; Chan, Shi, Song 2011).
  Each record lies in L = ⌊log2 T⌋ + 1 dyadic nodes; node noise N(0, σ²), σ² = L·C²/(2ρ);
  Var(Ŝ_t) = popcount(t)·σ². Laplace variant: node noise Lap(L·C/ε) for ε-DP (ℓ1 sensitivity C),
  Var = popcount(t)·2(L·C/ε)²; given ρ, ε = sqrt(2ρ) (ε-DP implies ε²/2-zCDP, Bun–Steinke 2016).
* ``"honaker"`` -- the same released nodes, each node re-estimated online from its own noisy value
  and its children's estimates by inverse-variance weighting (Honaker 2015; DP-FTRL's
  ``CummuNoiseEffTorch``). A node of height h has variance V_h = σ²·2^h/(2^{h+1} − 1), so
  Var(Ŝ_t) = Σ_{h ∈ bits of t} σ²/(2 − 2^{−h}). Same privacy as the tree.
* ``"sqrt"`` -- square-root factorisation A = L·L of the all-ones lower-triangular matrix
  (Fichtenberger, Henzinger, Upadhyay, ICML 2023; Henzinger, Upadhyay, Upadhyay, SODA 2023).
  L is lower-triangular Toeplitz with c_k = C(2k, k)/4^k; Ŝ = L(Lx + z). Sensitivity² = Σ_{k<T} c_k²,
  σ² = C²·Σ_{k<T} c_k²/(2ρ), Var(Ŝ_t) = σ²·Σ_{k<t} c_k².

Every mechanism here releases S_t plus a noise that does not depend on the data, so the counters
keep the exact running sum and add the mechanism's cumulative noise (``noise=False`` drops it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from fedsim.errors import ConfigError
from fedsim.registry import Registry

__all__ = [
    "COUNTERS",
    "BinaryTreeCounter",
    "ContinualCounter",
    "HonakerTreeCounter",
    "SqrtFactorizationCounter",
    "TreeNoise",
    "make_counter",
    "sqrt_coefficients",
    "sqrt_factor_matrix",
    "tree_levels",
]


def tree_levels(horizon: int) -> int:
    """L = ⌊log2 T⌋ + 1 = ⌈log2(T + 1)⌉, the number of tree nodes holding any one record."""
    return int(horizon).bit_length()


def sqrt_coefficients(n: int) -> np.ndarray:
    """c_k = C(2k, k)/4^k for k < n: the Taylor coefficients of (1 − x)^(−1/2).

    c = 1, 1/2, 3/8, 5/16, 35/128, … via c_k = c_{k−1}·(2k − 1)/(2k).
    """
    k = np.arange(1, max(int(n), 1), dtype=np.float64)
    return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])[: max(int(n), 0)]


def sqrt_factor_matrix(n: int) -> np.ndarray:
    """The lower-triangular Toeplitz square root L of the n×n all-ones lower-triangular matrix."""
    c = sqrt_coefficients(n)
    idx = np.subtract.outer(np.arange(n), np.arange(n))
    return np.where(idx >= 0, c[np.clip(idx, 0, None)], 0.0)


class TreeNoise:
    """Streamed cumulative noise b_t of the binary tree mechanism (optionally Honaker-weighted).

    A stack holds the completed nodes covering steps 1..t (one per set bit of t). At step t a leaf is
    pushed; two nodes of equal height merge into their parent, which gets fresh noise from
    ``draw(height, index)`` (index = position of the node within its level, from 0). The tree
    mechanism keeps the parent's own noise; the Honaker variant keeps
    a_h·z + b_h·(n_left + n_right) with a_h = 2^h/(2^{h+1}−1), b_h = (2^h−1)/(2^{h+1}−1),
    the inverse-variance combination of the node with its children's estimate.

    Parameters
    ----------
    shape : tuple of int
        Shape of one noise draw.
    draw : callable (height, index) -> np.ndarray
        Noise of one node, already scaled to the node std.
    honaker : bool (default: False)
        Use variance-reduced node estimates.
    """

    def __init__(self, shape: tuple[int, ...], draw: Callable[[int, int], np.ndarray], honaker: bool = False):
        self.shape = tuple(shape)
        self.draw = draw
        self.honaker = honaker
        self.steps = 0
        self.stack: list[tuple[int, np.ndarray]] = []

    def step(self) -> np.ndarray:
        """Advance one step and return the cumulative noise b_t (sum over the stack)."""
        self.steps += 1
        height, value = 0, np.asarray(self.draw(0, self.steps - 1), dtype=np.float64)
        while self.stack and self.stack[-1][0] == height:
            _, left = self.stack.pop()
            height += 1
            own = np.asarray(self.draw(height, (self.steps >> height) - 1), dtype=np.float64)
            if self.honaker:
                value = (2.0**height * own + (2.0**height - 1.0) * (left + value)) / (2.0 ** (height + 1) - 1.0)
            else:
                value = own
        self.stack.append((height, value))
        return self.cumulative()

    def cumulative(self) -> np.ndarray:
        """b_t for the current step (zeros before the first step)."""
        total = np.zeros(self.shape)
        for _, value in self.stack:
            total = total + value
        return total

    def complete(self) -> np.ndarray:
        """Tree completion: virtual steps until t is a power of two; returns b_t (then the root alone)."""
        while self.steps & (self.steps - 1):
            self.step()
        return self.cumulative()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "heights": [h for h, _ in self.stack],
                "values": [v.copy() for _, v in self.stack]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.stack = [(int(h), np.asarray(v, dtype=np.float64)) for h, v in zip(state["heights"], state["values"])]


class ContinualCounter:
    """Base class: streaming ``update(x) -> Ŝ_t`` and batch ``release(stream)``.

    Parameters
    ----------
    horizon : int
        T, the stream length the noise is calibrated for; longer streams are refused.
    rho : float
        ρ of ρ-zCDP for the whole stream (event-level: one record changes).
    shape : tuple of int (default: ())
        Shape of one record; ``()`` for scalar streams.
    sensitivity : float (default: 1.0)
        C, the bound on one record's ℓ2 norm (ℓ1 for Laplace noise). Larger records are clipped.
    noise : bool (default: True)
        ``False`` releases the exact prefix sums (for testing).
    rng : np.random.Generator, optional
        Noise source; default a generator seeded from OS entropy.
    """

    name: ClassVar[str] = ""
    _norm_ord: ClassVar[int] = 2

    def __init__(self, horizon: int, rho: float | None = None, *, shape: tuple[int, ...] = (),
                 sensitivity: float = 1.0, noise: bool = True, rng: np.random.Generator | None = None) -> None:
        if not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ConfigError("counter.horizon", f"must be a positive integer, got {horizon!r}",
                              "pass the number of releases T the counter must support")
        if rho is not None and not rho > 0:
            raise ConfigError("counter.rho", f"must be > 0, got {rho}", "ρ-zCDP needs a positive ρ, e.g. 0.5")
        if not sensitivity > 0:
            raise ConfigError("counter.sensitivity", f"must be > 0, got {sensitivity}", "use the record norm bound")
        self.horizon = int(horizon)
        self.rho = rho
        self.shape = tuple(int(s) for s in shape)
        self.sensitivity = float(sensitivity)
        self.noise = bool(noise)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.steps = 0
        self._sum = np.zeros(self.shape)

    # -- streaming ---------------------------------------------------------------------------
    def update(self, x: Any) -> Any:
        """Add record x_t and return the released prefix sum Ŝ_t (a float for scalar streams)."""
        if self.steps >= self.horizon:
            raise ConfigError("counter.horizon", f"stream is longer than the horizon T={self.horizon}",
                              "build the counter with a larger horizon (its noise depends on T)")
        self._sum = self._sum + self._clip(x)
        self.steps += 1
        out = self._sum + self._noise_step() if self.noise else self._sum.copy()
        return float(out) if out.ndim == 0 else out

    def release(self, stream: Any) -> np.ndarray:
        """Feed a whole stream (first axis = time); returns the releases, shape (n, *shape)."""
        stream = np.asarray(stream, dtype=np.float64)
        return np.stack([np.asarray(self.update(x), dtype=np.float64) for x in stream]) if len(stream) \
            else np.zeros((0, *self.shape))

    def _clip(self, x: Any) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != self.shape:
            raise ConfigError("counter.shape", f"record has shape {arr.shape}, expected {self.shape}",
                              "feed records of the shape the counter was built with")
        if not np.all(np.isfinite(arr)):
            raise ConfigError("counter.record", "record contains NaN or Inf", "clean the stream first")
        norm = float(np.linalg.norm(arr.ravel(), ord=self._norm_ord)) if arr.size else 0.0
        return arr if norm <= self.sensitivity else arr * (self.sensitivity / norm)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs to continue the same stream with the same noise process (the
        noise already drawn and the generator's state: keep checkpoints as private as the data)."""
        return {"steps": self.steps, "sum": self._sum.tolist(), "rng": self.rng.bit_generator.state,
                **self._noise_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._sum = np.asarray(state["sum"], dtype=np.float64).reshape(self.shape)
        self.rng.bit_generator.state = state["rng"]
        self._load_noise_state(state)

    def _noise_state(self) -> dict[str, Any]:
        return {}

    def _load_noise_state(self, state: dict[str, Any]) -> None:
        return None

    # -- to implement ------------------------------------------------------------------------
    def _noise_step(self) -> np.ndarray:
        raise NotImplementedError

    def theoretical_variance(self, t: int) -> float:
        """Exact variance of one coordinate of Ŝ_t − S_t."""
        raise NotImplementedError

    def variances(self) -> np.ndarray:
        """theoretical_variance(t) for t = 1..T."""
        return np.array([self.theoretical_variance(t) for t in range(1, self.horizon + 1)])

    def _require_rho(self) -> float:
        if self.rho is None:
            raise ConfigError("counter.rho", f"the {self.name} counter needs ρ", "pass rho=...")
        return float(self.rho)


COUNTERS: Registry[type[ContinualCounter]] = Registry("counter")


@COUNTERS.register("tree")
class BinaryTreeCounter(ContinualCounter):
    """Binary tree mechanism with Gaussian (ρ-zCDP) or Laplace (ε-DP) node noise.

    ``distribution="laplace"`` takes ``epsilon`` (pure ε-DP, ℓ1 sensitivity) or, if only ``rho``
    is given, ε = sqrt(2ρ) so that the release is ρ-zCDP.
    """

    name = "tree"
    honaker: ClassVar[bool] = False

    def __init__(self, horizon: int, rho: float | None = None, *, epsilon: float | None = None,
                 distribution: str = "gaussian", **kwargs: Any) -> None:
        if distribution not in ("gaussian", "laplace") or (distribution == "laplace" and self.honaker):
            raise ConfigError("counter.distribution", f"unsupported noise {distribution!r} for {self.name}",
                              "use 'gaussian' (or 'laplace' with the plain tree)")
        self.distribution = distribution
        self._norm_ord = 1 if distribution == "laplace" else 2
        super().__init__(horizon, rho, **kwargs)
        self.levels = tree_levels(self.horizon)
        if distribution == "laplace":
            if epsilon is None:
                epsilon = math.sqrt(2.0 * self._require_rho())
            if not epsilon > 0:
                raise ConfigError("counter.epsilon", f"must be > 0, got {epsilon}", "pass a positive ε")
            self.epsilon = float(epsilon)
            self.node_scale = self.levels * self.sensitivity / self.epsilon  # Laplace b
            self.node_variance = 2.0 * self.node_scale**2
        else:
            self.node_scale = self.sensitivity * math.sqrt(self.levels / (2.0 * self._require_rho()))
            self.node_variance = self.node_scale**2
        self._tree = TreeNoise(self.shape, self._draw, honaker=self.honaker)

    def _draw(self, height: int, index: int) -> np.ndarray:
        if self.distribution == "laplace":
            return self.rng.laplace(0.0, self.node_scale, self.shape)
        return self.rng.standard_normal(self.shape) * self.node_scale

    def _noise_step(self) -> np.ndarray:
        return self._tree.step()

    def _noise_state(self) -> dict[str, Any]:
        tree = self._tree.state_dict()
        return {"tree": {**tree, "values": [np.asarray(v).tolist() for v in tree["values"]]}}

    def _load_noise_state(self, state: dict[str, Any]) -> None:
        self._tree.load_state_dict(state["tree"])

    def theoretical_variance(self, t: int) -> float:
        return int(t).bit_count() * self.node_variance


@COUNTERS.register("honaker")
class HonakerTreeCounter(BinaryTreeCounter):
    """Tree mechanism with Honaker's online variance reduction (Gaussian noise only)."""

    name = "honaker"
    honaker = True

    def theoretical_variance(self, t: int) -> float:
        bits = [h for h in range(int(t).bit_length()) if (int(t) >> h) & 1]
        return sum(self.node_variance / (2.0 - 2.0**-h) for h in bits)


@COUNTERS.register("sqrt")
class SqrtFactorizationCounter(ContinualCounter):
    """Square-root matrix factorisation counter: Ŝ_t = S_t + Σ_{j≤t} c_{t−j} z_j, z_j ~ N(0, σ²)."""

    name = "sqrt"

    def __init__(self, horizon: int, rho: float | None = None, **kwargs: Any) -> None:
        super().__init__(horizon, rho, **kwargs)
        self.coefficients = sqrt_coefficients(self.horizon)
        self._partial = np.cumsum(self.coefficients**2)  # Σ_{k<t} c_k² at index t − 1
        self.sensitivity_squared = float(self._partial[-1])  # max column norm² of L
        self.node_scale = self.sensitivity * math.sqrt(self.sensitivity_squared / (2.0 * self._require_rho()))
        self._z: np.ndarray | None = None

    def _history(self) -> np.ndarray:
        if self._z is None:
            self._z = np.zeros((self.horizon, *self.shape))
        return self._z

    def _noise_step(self) -> np.ndarray:
        z = self._history()
        t = self.steps
        z[t - 1] = self.rng.standard_normal(self.shape) * self.node_scale
        return np.tensordot(self.coefficients[t - 1 :: -1], z[:t], axes=(0, 0))

    def _noise_state(self) -> dict[str, Any]:
        return {"z": self._history()[:self.steps].tolist()}

    def _load_noise_state(self, state: dict[str, Any]) -> None:
        z = np.asarray(state["z"], dtype=np.float64).reshape(-1, *self.shape)
        self._history()[:len(z)] = z

    def release(self, stream: Any) -> np.ndarray:
        stream = np.asarray(stream, dtype=np.float64)
        n = len(stream)
        if self.steps or not self.noise or n == 0 or n > self.horizon:
            return super().release(stream)
        # Fresh counter: the same noise draws as n calls of update(), combined in one convolution.
        clipped = np.stack([self._clip(x) for x in stream])
        z = self._history()
        z[:n] = self.rng.standard_normal((n, *self.shape)) * self.node_scale
        flat = z[:n].reshape(n, -1)
        if n * n * flat.shape[1] <= 5e7:  # small: exact triangular matmul; else FFT convolution
            noise = sqrt_factor_matrix(n) @ flat
        else:
            from scipy import signal  # scipy.signal takes about a second to import

            noise = signal.fftconvolve(flat, self.coefficients[:n, None], axes=0)[:n]
        sums = np.cumsum(clipped, axis=0)
        self.steps, self._sum = n, sums[-1].copy()
        return sums + noise.reshape(n, *self.shape)

    def theoretical_variance(self, t: int) -> float:
        return float(self.node_scale**2 * self._partial[int(t) - 1])


def make_counter(name: str, horizon: int, rho: float | None = None, **kwargs: Any) -> ContinualCounter:
    """Build a registered counter (``"tree"``, ``"honaker"``, ``"sqrt"``)."""
    return COUNTERS.get(name, key="counter.mechanism")(horizon, rho, **kwargs)
