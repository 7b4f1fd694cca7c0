"""The Triton backend at real sizes on a GPU (p 97, N 500, B 1024); skipped without CUDA.

Low precision is judged by the error-ratio rule against an fp64 reference: a tensor x computed in tf32 or
bf16 passes when max|x - ref64| <= 2 max|x_torch - ref64| + atol, x_torch being PyTorch in the same precision."""

import pytest
import torch

from compare import assert_close
from philox import dropout_mask

from fastgrok import reference
from fastgrok.backends import TritonBackend, _grads
from fastgrok.config import Hyper, Settings
from fastgrok.population import Population

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
P, WIDTH, B = 97, 500, 1024


def grid(width=WIDTH, models=B):
    xis, alphas, lrs, wds, drops = (0.0, 0.2, 0.4), (0.3, 0.5, 0.7, 0.9), (1e-2, 3e-3), (0.0, 1.0, 5.0), (0.0, 0.0, 0.3)
    return [Hyper(xi=xis[i % 3], alpha=alphas[i % 4], width=width, lr=lrs[i % 2], wd=wds[i % 3], dropout=drops[(i // 3) % 3], seed=i)
            for i in range(models)]


def test_one_step_at_real_size_matches_reference():
    hypers = grid()
    pop = Population(hypers, Settings(p=P), "cuda")
    picks = [0, 5, 511, 1023]
    refs = {}
    for b in picks:
        mlp = pop.model(b)
        h, d = hypers[b], int(pop.D[b])
        opt = reference.make_optimizer(mlp, "adamw", h.lr, h.wd, (0.9, 0.98), 1e-8)
        pairs = pop.train_m[b, :d] * P + pop.train_n[b, :d]
        mask = dropout_mask(int(pop.dropout_seed[b]), 0, h.dropout, pairs, WIDTH) if h.dropout else None
        value = reference.train_step(mlp, opt, *(t[b, :d].cpu() for t in (pop.train_m, pop.train_n, pop.train_y)), "mse", mask)
        refs[b] = (mlp, value)
    losses = TritonBackend("fp32").step(pop)
    for b, (mlp, value) in refs.items():
        assert_close(f"loss[{b}]", losses[b], torch.tensor(value))
        for name, ours, theirs in (("U", pop.U[b], mlp.U.T), ("V", pop.V[b], mlp.V.T), ("W", pop.W[b], mlp.W.T)):
            assert_close(f"{name}[{b}]", ours, theirs)


def test_deterministic_and_together_equals_alone_at_real_size():
    hypers = grid()
    runs = []
    for _ in range(2):
        pop = Population(hypers, Settings(p=P), "cuda")
        engine = TritonBackend("tf32")
        for _ in range(3):
            engine.step(pop)
        runs.append(pop)
    for name in ("U", "V", "W"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name
    for b in (7, 800):
        alone = Population([hypers[b]], Settings(p=P), "cuda")
        engine = TritonBackend("tf32")
        for _ in range(3):
            engine.step(alone)
        assert torch.equal(runs[0].U[b], alone.U[0])


@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "bf16"])
def test_low_precision_by_the_error_ratio_rule(precision):
    from fastgrok.kernels.backward import backward
    from fastgrok.kernels.forward import forward

    pop = Population(grid(models=64), Settings(p=P), "cuda")
    engine = TritonBackend(precision)
    data = engine._data(pop)
    _, G, _ = forward(*pop.params, data["m"], data["n"], data["y"], data["count"], act=0, loss=0, precision=precision, train=True)
    ours = backward(*pop.params, data["m"], data["n"], data["count"], G, act=0, precision=precision)
    args = (pop.train_m, pop.train_n, pop.train_y, pop.valid, data["D"].double(), None, "quad", "mse")
    ref64 = _grads(*(t.double() for t in pop.params), *args)[1:]
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = precision != "tf32x3"  # torch's closest to tf32x3 is fp32
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            same = _grads(*pop.params, *args[:4], data["D"], None, "quad", "mse")[1:]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    for name, x, t, r in zip(("dU", "dV", "dW"), ours, same, ref64):
        err, err_torch = (x.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * err_torch + 1e-7, f"{name} {precision}: error {err:.3e} vs torch's {err_torch:.3e}"
