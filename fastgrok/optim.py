"""AdamW, Adam and SGD over stacked parameters (B, ...) with per-model lr, weight decay, betas and eps.

Written op for op as torch.optim's single-tensor implementations (torch/optim/adamw.py, adam.py, sgd.py) so
that a population matches the reference within fp32 rounding:

    g = grad + l2 * param                     (Adam and SGD: weight decay as an L2 term)
    SGD:    param -= step_size * g
    Adam*:  param *= decay                    (AdamW: decay = 1 - lr wd, decoupled)
            m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
            param -= step_size * m / (sqrt(v) / bias2_sqrt + eps)

`coefficients` computes the per-model scalars on the host in float64, as torch does in Python; the torch
path below and the Triton kernel (kernels/optimizer.py) both consume them. Models whose `active` flag is off
keep their parameters and moments unchanged. A tensor whose `decay` flag is off (a LayerNorm's, as torch
users leave norms out of weight decay) is stepped with no weight decay.
"""

from __future__ import annotations

import torch

OPTIMIZER_CODES = {"adamw": 0, "adam": 1, "sgd": 2}


def coefficients(name: str, step: int, lr, wd, beta1, beta2) -> dict[str, torch.Tensor]:
    """Per-model (B,) float64 scalars of one step (step counts from 1)."""
    lr, wd, b1, b2 = (t.double() for t in (lr, wd, beta1, beta2))
    if name == "sgd":
        return {"decay": torch.ones_like(lr), "l2": wd, "step_size": lr, "bias2_sqrt": torch.ones_like(lr),
                "beta1": b1, "beta2": b2}
    return {
        "decay": 1 - lr * wd if name == "adamw" else torch.ones_like(lr),
        "l2": torch.zeros_like(wd) if name == "adamw" else wd,
        "step_size": lr / (1 - b1**step),
        "bias2_sqrt": (1 - b2**step).sqrt(),
        "beta1": b1,
        "beta2": b2,
    }


def _col(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def per_tensor(name: str, step: int, lr, wd, beta1, beta2, decay) -> list[dict[str, torch.Tensor]]:
    """coefficients for each tensor: with the models' weight decay, or none where its decay flag is off."""
    with_wd = coefficients(name, step, lr, wd, beta1, beta2)
    without = coefficients(name, step, lr, torch.zeros_like(wd), beta1, beta2) if not all(decay) else with_wd
    return [with_wd if flag else without for flag in decay]


@torch.no_grad()
def step_(name: str, params, grads, exp_avgs, exp_avg_sqs, step: int, lr, wd, beta1, beta2, eps,
          active: torch.Tensor, decay: tuple[bool, ...] | None = None) -> None:
    """One optimizer step in place. lr, wd, beta1, beta2, eps, active: (B,) tensors; decay: a flag per tensor
    (default: every tensor decays)."""
    coefs = per_tensor(name, step, lr, wd, beta1, beta2, decay or (True,) * len(params))
    frozen = (~active).nonzero().flatten()
    for i, (param, grad) in enumerate(zip(params, grads)):
        c = coefs[i]
        col = lambda key: _col(c[key], param)  # noqa: E731,B023
        state = (param,) if name == "sgd" else (param, exp_avgs[i], exp_avg_sqs[i])
        # Frozen models' rows are put back after the update. On a CPU that is 1.8-5x faster than computing every
        # value out of place and selecting with torch.where (the cpu-demo population's optimizer step: 1.4-4
        # against 7-7.5 ms on the shared 2-core machine; bit-identical). On a GPU, finding them costs a host sync
        # a step (the Triton backend has an optimizer kernel of its own).
        kept = [t[frozen] for t in state] if len(frozen) else None
        if name != "adamw":
            grad = grad + col("l2") * param
        if name == "sgd":
            param.sub_(col("step_size") * grad)
        else:  # in place, the operations of the docstring in its order
            m, v = exp_avgs[i], exp_avg_sqs[i]
            m.lerp_(grad, _col(1 - c["beta1"], param))
            v.mul_(col("beta2")).add_(_col(1 - c["beta2"], param) * grad * grad)
            denom = v.sqrt().div_(col("bias2_sqrt")).add_(_col(eps, param))
            param.mul_(col("decay")).sub_(col("step_size") * m / denom)
        if kept is not None:
            for t, saved in zip(state, kept):
                t[frozen] = saved
