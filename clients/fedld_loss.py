"""FedLD margin-control regulariser (client side).

Reference
---------
Zeng et al., MICCAI 2024 (arXiv 2408.12300); official code Zeng-Shuang/FedLD,
``methods/fedld.py::MarginalLogLoss``. Spec: ``server-algorithms.md`` section 1, "Client loss".

For logits ``Z`` (``B x C``) and ``P = softmax(Z)`` the client minimises
``CE_mean(Z, y) + lambda * log(1 + ||P||_F^2)``. In the reference code the squared norm is taken over
the WHOLE batch (``torch.norm(softmax, p=2)`` flattens the matrix), which is the default here; the
per-sample form ``mean_i log(1 + sum_c p_ic^2)`` is available with ``per_sample=True``.
The penalty is smallest for flat predictions, so it caps over-confident margins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fedld_loss", "margin_penalty"]


def margin_penalty(logits: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """``log(1 + ||softmax(logits)||_F^2)`` over the batch, or its per-sample mean.

    Parameters
    ----------
    logits
        ``(B, C)`` tensor.
    per_sample
        False (reference code): one log over the batch-wide Frobenius norm.
        True: ``mean_i log(1 + ||p_i||^2)``.

    Examples
    --------
    Uniform predictions (``p_ic = 1/C``) give ``log(1 + B/C)`` (batch form) and ``log(1 + 1/C)``
    (per-sample form).
    """
    if logits.ndim != 2:
        raise ValueError(f"margin_penalty expects (batch, classes) logits, got shape {tuple(logits.shape)}")
    p = torch.softmax(logits, dim=1)
    if per_sample:
        return torch.log1p((p * p).sum(dim=1)).mean()
    return torch.log1p((p * p).sum())


def fedld_loss(logits: torch.Tensor, targets: torch.Tensor, lam: float = 0.03,
               per_sample: bool = False) -> torch.Tensor:
    """``CE_mean(logits, targets) + lam * margin_penalty(logits)``; ``lam = 0`` is plain CE.

    The reference's ``options.py`` default is ``lam = 0.03`` (its README run uses 0.1).
    """
    ce = F.cross_entropy(logits, targets)
    if lam == 0:
        return ce
    return ce + lam * margin_penalty(logits, per_sample=per_sample)
