"""Noise multipliers the accountants account soundly and in bounded time and memory.

* Every accountant computes 1/σ² and σ²: outside ``[MIN_NOISE, MAX_NOISE]`` these underflow or overflow
  (σ = 1e-300 divides by zero, σ = 1e308 overflows), so a non-zero σ outside it is refused.
* The PLD accountant (``dp_accounting``'s privacy-loss distribution, discretised every 1e-4 of loss) needs a
  grid that grows as the privacy loss's range, ≈ 1/σ²: measured with q = 0.01 (`fedsim privacy epsilon
  --accountant pld`, one core) 100 steps take 11 s and 0.84 GB at σ = 0.1, 38 s and 2.8 GB at σ = 0.05, over
  100 s and 7 GB at σ = 0.03, and run out of memory (150 GiB asked) at σ = 1e-3; 1000 steps at σ = 0.2 take
  5 s and 0.5 GB (ε ≈ 229 there). :data:`PLD_MIN_NOISE` is where it stays within seconds; below it the RDP
  accountant answers in milliseconds (and ε is in the hundreds anyway).
"""

MIN_NOISE, MAX_NOISE = 1e-3, 1e6  #: the range of a non-zero noise multiplier for every accountant
PLD_MIN_NOISE = 0.2  #: the smallest non-zero Gaussian noise multiplier the PLD accountant takes



def outside_accountable_range(sigma: float) -> bool:
    """Whether a noise multiplier is neither 0 (no noise) nor in ``[MIN_NOISE, MAX_NOISE]``."""
    return sigma != 0 and not MIN_NOISE <= sigma <= MAX_NOISE


__all__ = ["MAX_NOISE", "MIN_NOISE", "PLD_MIN_NOISE", "outside_accountable_range"]
