"""``torch.optim.SGD`` without its per-call wrappers, for the local loop's many short steps."""

from __future__ import annotations

import torch
from torch.optim import optimizer as _optim
from torch.optim.sgd import _single_tensor_sgd


class FastSGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose ``step`` and ``zero_grad`` skip PyTorch's per-call machinery when
    nothing needs it.

    ``Optimizer.step`` runs inside a profiler ``record_function``, the global and per-optimizer hook
    chains and a grad-mode switch that imports ``torch._dynamo`` on every call; ``zero_grad`` inside
    another ``record_function`` and a ``torch._disable_dynamo`` wrapper. For a federation's small models
    (an MLP step is a few hundred µs on a CPU) that machinery is about a fifth of a step. When no hook
    is registered, no closure is passed and every parameter group is plain dense SGD on the CPU (no
    ``maximize``, ``foreach``, ``fused`` or ``differentiable``, no tensor learning rate or weight
    decay), :meth:`step` calls PyTorch's own single-tensor SGD update (``torch.optim.sgd.
    _single_tensor_sgd``, what ``SGD.step`` dispatches to on the CPU) on the lists ``SGD.step`` builds,
    and stores the momentum buffers as it does: the same arithmetic, bit for bit
    (``tests/clients/test_fast_sgd.py``). Anything else takes ``SGD.step`` itself.

    The two fast methods are instance attributes: ``Optimizer`` wraps its class's ``step`` with the
    profiler and the hooks, so a method of this class would be wrapped too. Wrappers such as Opacus's
    ``DPOptimizer`` call ``original_optimizer.step()`` and get the fast one.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step = self._fast_step  # type: ignore[method-assign]
        self.zero_grad = self._fast_zero_grad  # type: ignore[method-assign]

    def _plain(self) -> bool:
        """Whether :meth:`_fast_step` gives exactly what ``SGD.step`` would."""
        if (_optim._global_optimizer_pre_hooks or _optim._global_optimizer_post_hooks
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks):
            return False
        for g in self.param_groups:
            if (g["maximize"] or g["foreach"] or g["fused"] or g["differentiable"]
                    or isinstance(g["lr"], torch.Tensor) or isinstance(g["weight_decay"], torch.Tensor)):
                return False
            for p in g["params"]:
                grad = p.grad
                if grad is not None and (grad.is_sparse or p.device.type != "cpu"):
                    return False
        return True

    def _fast_step(self, closure=None):
        if closure is not None or not self._plain():
            return torch.optim.SGD.step(self, closure)
        with torch.no_grad():
            for group in self.param_groups:
                params: list[torch.Tensor] = []
                grads: list[torch.Tensor] = []
                buffers: list[torch.Tensor | None] = []
                self._init_group(group, params, grads, buffers)
                momentum = group["momentum"]
                _single_tensor_sgd(params, grads, buffers, None, None, weight_decay=group["weight_decay"],
                                   momentum=momentum, lr=group["lr"], dampening=group["dampening"],
                                   nesterov=group["nesterov"], maximize=False, has_sparse_grad=False)
                if momentum != 0:
                    for p, buf in zip(params, buffers):
                        self.state[p]["momentum_buffer"] = buf
        return None

    def _fast_zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none or self.defaults.get("foreach") or self.defaults.get("fused"):
            return torch.optim.SGD.zero_grad(self, set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        return None
