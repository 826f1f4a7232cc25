"""NovoGrad (Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of
Deep Networks", arXiv:1905.11286): Adam-like, with one second moment per parameter tensor (layer).

Follows NVIDIA NeMo's `Novograd`, nemo/core/optim/novograd.py, the optimiser MatchboxNet was trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class NovoGrad(Optimizer):
    """Per parameter tensor ``p`` with gradient ``g``, at each step (NeMo's update, term by term)::

        v = ||g||^2                          while v is still 0 (the first step)
        v = beta2 * v + (1 - beta2) * ||g||^2 afterwards             (a scalar per tensor)
        d = g / (sqrt(v) + eps) + weight_decay * p
        m = beta1 * m + d                    (grad_averaging: beta1 * m + (1 - beta1) * d)
        p = p - lr * m

    `amsgrad` normalises by the running maximum of v instead. NeMo's defaults: betas (0.95, 0.98),
    grad_averaging off. Unlike NeMo, the update leaves ``p.grad`` as it was (NeMo divides it in place);
    NeMo's layer-wise update clipping (`luc`) is not implemented.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_averaging: bool = False,
        amsgrad: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"optimizer.lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"optimizer.eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {weight_decay}")
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), e.g. [0.95, 0.5]; got {betas}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
            amsgrad=amsgrad,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("NovoGrad does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    # One second moment per tensor: a 0-d tensor on the parameter's device.
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                norm = grad.square().sum()
                # NeMo: copy the first norm in while the moment is 0, then average. A where() instead of
                # `if exp_avg_sq == 0` keeps it on the device (no host sync per tensor).
                exp_avg_sq.copy_(
                    torch.where(exp_avg_sq == 0, norm, exp_avg_sq * beta2 + norm * (1.0 - beta2))
                )
                if group["amsgrad"]:
                    max_exp_avg_sq = state["max_exp_avg_sq"]
                    torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                    denom = max_exp_avg_sq.sqrt() + group["eps"]
                else:
                    denom = exp_avg_sq.sqrt() + group["eps"]

                update = grad / denom
                if group["weight_decay"] != 0:
                    update = update.add(p, alpha=group["weight_decay"])
                if group["grad_averaging"]:
                    update = update * (1.0 - beta1)
                exp_avg.mul_(beta1).add_(update)
                p.add_(exp_avg, alpha=-group["lr"])
        return loss
