"""AdamW / Adam / SGD update of one stacked parameter (B, ...) in place, per-model coefficients.

The math is fastgrok.optim's (torch.optim's single-tensor order of operations); the per-model scalars come
from fastgrok.optim.coefficients. Models with active = 0 are left untouched. Never autotuned: it updates in
place, and autotuning would run it several times.
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels.hidden import aligned
from fastgrok.kernels.layout import alignment
from fastgrok.optim import OPTIMIZER_CODES, per_tensor


@triton.jit
def _optimizer_kernel(
    # pointers
    PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, ACTIVE, DECAY, L2, STEP_SIZE, BIAS2_SQRT, BETA1, BETA2, EPS,
    # sizes
    numel,
    # meta-parameters
    MODE: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    numel = aligned(numel, ALIGN)  # 16-byte vectors when a model's parameter count allows (N 500: 48,500)
    if tl.load(ACTIVE + b) != 0:
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        base = b * numel
        param = tl.load(PARAM + base + offs, mask=mask)
        grad = tl.load(GRAD + base + offs, mask=mask)
        step_size = tl.load(STEP_SIZE + b)
        if MODE != 0:
            grad = grad + tl.load(L2 + b) * param
        if MODE == 2:
            param = param - step_size * grad
        else:
            beta1 = tl.load(BETA1 + b)
            beta2 = tl.load(BETA2 + b)
            m = tl.load(EXP_AVG + base + offs, mask=mask)
            v = tl.load(EXP_AVG_SQ + base + offs, mask=mask)
            m = m + (1.0 - beta1) * (grad - m)  # torch's lerp(m, g, 1 - beta1) for weights < 0.5
            v = v * beta2 + (1.0 - beta2) * grad * grad
            denom = tl.sqrt(v) / tl.load(BIAS2_SQRT + b) + tl.load(EPS + b)
            param = param * tl.load(DECAY + b) - step_size * m / denom
            tl.store(EXP_AVG + base + offs, m, mask=mask)
            tl.store(EXP_AVG_SQ + base + offs, v, mask=mask)
        tl.store(PARAM + base + offs, param, mask=mask)


def optimizer_step_(name: str, params, grads, exp_avgs, exp_avg_sqs, step: int, lr, wd, beta1, beta2, eps,
                    active: torch.Tensor, decay: tuple[bool, ...] | None = None, block: int = 1024) -> None:
    coefs = per_tensor(name, step, lr, wd, beta1, beta2, decay or (True,) * len(params))
    active = active.to(torch.int8)
    for i, (param, grad, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        c = {k: t.float() for k, t in coefs[i].items()}
        B = param.shape[0]
        numel = param[0].numel()
        assert param.is_contiguous() and grad.is_contiguous() and grad.shape == param.shape
        _optimizer_kernel[(B, triton.cdiv(numel, block))](
            param, grad, m, v, active, c["decay"], c["l2"], c["step_size"], c["bias2_sqrt"], c["beta1"],
            c["beta2"], eps.float(), numel, MODE=OPTIMIZER_CODES[name], BLOCK=block, ALIGN=alignment(numel),
        )
