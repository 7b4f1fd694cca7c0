"""AdamW, Adam and SGD over stacked parameters (B, ...) with per-model lr, weight decay, betas and eps.

Written op for op as torch.optim's single-tensor implementations (torch/optim/adamw.py, adam.py, sgd.py) so
that a population matches the reference within fp32 rounding. Models whose `active` flag is off keep their
parameters and moments unchanged.
"""

from __future__ import annotations

import torch


def _col(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def step_(name: str, params, grads, exp_avgs, exp_avg_sqs, step: int, lr, wd, beta1, beta2, eps,
          active: torch.Tensor) -> None:
    """One optimizer step in place. lr, wd, beta1, beta2, eps, active: (B,) tensors; step counts from 1."""
    lr64, wd64, b1, b2 = (t.double() for t in (lr, wd, beta1, beta2))
    bias1 = 1 - b1**step
    bias2_sqrt = (1 - b2**step).sqrt()
    for i, (param, grad) in enumerate(zip(params, grads)):
        keep = _col(active, param)
        col = lambda t: _col(t, param).to(param.dtype)  # noqa: E731
        if name == "sgd":
            new = param - col(lr64) * (grad + col(wd64) * param)
            param.copy_(torch.where(keep, new, param))
            continue
        m, v = exp_avgs[i], exp_avg_sqs[i]
        if name == "adamw":
            p0 = param * col(1 - lr64 * wd64)
        else:  # adam: L2 penalty added to the gradient
            p0, grad = param, grad + col(wd64) * param
        m_new = m.lerp(grad, col(1 - b1))
        v_new = v * col(b2) + col(1 - b2) * grad * grad
        denom = v_new.sqrt() / col(bias2_sqrt) + col(eps)
        new = p0 - col(lr64 / bias1) * m_new / denom
        param.copy_(torch.where(keep, new, param))
        m.copy_(torch.where(keep, m_new, m))
        v.copy_(torch.where(keep, v_new, v))
