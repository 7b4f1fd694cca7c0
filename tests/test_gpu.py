"""The Triton backend (and the torch backend's BatchNorm) at real sizes on a GPU (p 97, N 500, B 1024); skipped
without CUDA.

Low precision is judged by the error-ratio rule against an fp64 reference: a tensor x computed in tf32 or
bf16 passes when max|x - ref64| <= 2 max|x_torch - ref64| + atol, x_torch being PyTorch in the same precision."""

import pytest
import torch

from compare import assert_close
from philox import dropout_mask

from fastgrok import reference
from fastgrok.bench import TRITON_STEPS
from fastgrok.families import mlp as one_hot
from fastgrok.families.mlp_triton import TritonBackend
from fastgrok.config import Hyper, Settings
from fastgrok.population import Population

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
P, WIDTH, B = 97, 500, 1024


def grid(width=WIDTH, models=B):
    xis, alphas, lrs, wds, drops = (0.0, 0.2, 0.4), (0.3, 0.5, 0.7, 0.9), (1e-2, 3e-3), (0.0, 1.0, 5.0), (0.0, 0.0, 0.3)
    return [Hyper(xi=xis[i % 3], alpha=alphas[i % 4], width=width, lr=lrs[i % 2], wd=wds[i % 3], dropout=drops[(i // 3) % 3], seed=i)
            for i in range(models)]


@pytest.mark.parametrize("scatter", ["window", "block"])
@pytest.mark.parametrize("width, models", [(WIDTH, B), (8, 64), (4096, 16)])  # widths 8 to 4096
def test_one_step_at_real_size_matches_reference(scatter, width, models):
    hypers = grid(width, models)
    pop = Population(hypers, Settings(p=P), "cuda")
    picks = [0, 7, models // 2 - 1, models - 1]  # 7 with dropout
    refs = {}
    for b in picks:
        mlp = pop.model(b)
        h, d = hypers[b], int(pop.D[b])
        opt = reference.make_optimizer(mlp, "adamw", h.lr, h.wd, (0.9, 0.98), 1e-8)
        pairs = pop.train_x[0, b, :d] * P + pop.train_x[1, b, :d]
        mask = dropout_mask(int(pop.dropout_seed[b]), 0, h.dropout, pairs, width) if h.dropout else None
        value = reference.train_step(mlp, opt, pop.train_x[:, b, :d].cpu(), pop.train_y[b, :d].cpu(), "mse", mask)
        refs[b] = (mlp, value)
    losses = TRITON_STEPS[scatter]("fp32").step(pop)
    for b, (mlp, value) in refs.items():
        assert_close(f"loss[{b}]", losses[b], torch.tensor(value))
        for name, ours, theirs in (("U", pop.U[b], mlp.U.T), ("V", pop.V[b], mlp.V.T), ("W", pop.W[b], mlp.W.T)):
            assert_close(f"{name}[{b}]", ours, theirs)


def test_torch_backend_with_batchnorm_and_minibatches_at_real_size():
    """BatchNorm runs on the torch backend, also on a GPU; 64 models, minibatches of 256, against reference.py on
    the CPU. The first step's gradients by the error-ratio rule against fp64 autograd: BatchNorm's backward
    subtracts nearly equal terms, so its smallest gradients (~1e-9) carry rounding of relative size ~0.2 in any
    fp32 implementation (the reference's too), and Adam's first steps, g / (|g| + 1e-8), magnify that into
    weights that differ by up to ~2e-4 in a few entries: weights are compared exactly in the small CPU tests.
    Then 5 steps of losses and BatchNorm's running statistics."""
    from dataclasses import replace

    from fastgrok.backends import TorchBackend
    from fastgrok.data import batch_slots

    hypers = [replace(h, dropout=0.0) for h in grid(models=64)]
    pop = Population(hypers, Settings(p=P, batch_size=256, batchnorm=True), "cuda")
    picks = (0, 33, 63)

    def batches(b, t):  # model b's minibatch at step t: its operands and labels
        slots = batch_slots(hypers[b].seed, int(pop.D[b]), 256, t)
        return pop.train_x[:, b, : int(pop.D[b])].cpu()[:, slots], pop.train_y[b, : int(pop.D[b])].cpu()[slots]

    x, y, valid, D = pop.batch()
    ours = one_hot.grads((pop.U, pop.V), pop.W, x, y, valid, D, None, "quad", "mse", (pop.bn_weight, pop.bn_bias))[1:6]
    for b in picks:
        grads = {}
        for dtype in (torch.float32, torch.float64):
            mlp = pop.model(b).cpu().to(dtype)
            (bm, bn), by = batches(b, 0)
            reference.per_example_loss(mlp(bm, bn), by, "mse").mean().backward()
            grads[dtype] = (mlp.U.grad.T, mlp.V.grad.T, mlp.W.grad.T, mlp.bn.weight.grad, mlp.bn.bias.grad)
        for name, x, t, r in zip(("dU", "dV", "dW", "dgamma", "dbeta"), ours, grads[torch.float32], grads[torch.float64]):
            err, err_ref = (x[b].cpu().double() - r).abs().max().item(), (t.double() - r).abs().max().item()
            assert err <= 2 * err_ref + 1e-9, f"{name}[{b}]: error {err:.3e} vs the fp32 reference's {err_ref:.3e}"
    refs = {}
    for b in picks:
        mlp, h = pop.model(b).cpu(), hypers[b]
        refs[b] = (mlp, reference.make_optimizer(mlp, "adamw", h.lr, h.wd, (0.9, 0.98), 1e-8))
    engine = TorchBackend()
    for t in range(5):
        losses = engine.step(pop)
        for b, (mlp, opt) in refs.items():
            assert_close(f"loss[{b}] at step {t}", losses[b], torch.tensor(reference.train_step(mlp, opt, *batches(b, t))))
    for b, (mlp, _) in refs.items():
        assert_close(f"running_mean[{b}]", pop.running_mean[b], mlp.bn.running_mean)
        assert_close(f"running_var[{b}]", pop.running_var[b], mlp.bn.running_var)


@pytest.mark.parametrize("pad", [0, 1 << 30])
@pytest.mark.parametrize("settings", [Settings(p=P), Settings(p=P, batch_size=256, batchnorm=True)])
def test_torch_backend_peak_memory_is_within_the_planners_estimate(monkeypatch, settings, pad):
    """The planner sizes torch populations with bytes_per_model: a step must not use more (64 models, a third
    of them with dropout), also with the outputs padded to a multiple of 8 (GPU_PAD_BELOW, bench/torch_knobs.py)."""
    import fastgrok.families.mlp
    from fastgrok.backends import TorchBackend
    from fastgrok.data import task_table
    from fastgrok.planner import bytes_per_model

    monkeypatch.setattr(fastgrok.families.mlp, "GPU_PAD_BELOW", pad)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pop = Population(grid(models=64), settings, "cuda")
    TorchBackend().step(pop)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / len(pop)
    num_pairs = task_table("add", P)[1].numel()
    estimate = bytes_per_model(settings, WIDTH, pop.train_y.shape[1], num_pairs, TorchBackend())
    assert peak <= estimate, f"a step used {peak / 2**20:.1f} MiB per model, the planner assumes {estimate / 2**20:.1f}"


@pytest.mark.parametrize("settings, width", [(Settings(model="deep-mlp", depth=3, act="relu", p=P), 500),
                                             (Settings(model="transformer", act="relu", p=P), 128)])
def test_a_deeper_familys_planned_memory_is_within_20_percent_of_a_steps_peak(settings, width):
    """The paper's deep MLP and transformer, 64 models of p 97: the planner's bytes a model (tensors, data and
    the family's step bytes, fitted on the CPU) against the peak a torch step allocates on the GPU."""
    from fastgrok.backends import TorchBackend
    from fastgrok.data import task_table
    from fastgrok.planner import bytes_per_model

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pop = Population([Hyper(width=width, seed=i) for i in range(64)], settings, "cuda")
    TorchBackend().step(pop)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / len(pop)
    num_pairs = task_table("add", P)[1].numel()
    estimate = bytes_per_model(settings, width, pop.train_y.shape[1], num_pairs, TorchBackend())
    assert 0.8 * peak <= estimate <= 1.2 * peak, f"peak {peak / 2**20:.1f} MiB a model, planned {estimate / 2**20:.1f}"


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_torch_backend_outputs_padded_to_8_change_nothing(monkeypatch, loss):
    """With GPU_PAD_BELOW above p (what bench/torch_knobs.py --knob gpu-pad times), p 97's outputs are padded to
    104 with zero columns of W: five fp32 steps of 64 models give the losses and weights of the unpadded step."""
    import fastgrok.families.mlp
    from fastgrok.backends import TorchBackend

    settings, engine = Settings(p=P, loss=loss), TorchBackend()
    plain, padded = (Population(grid(models=64), settings, "cuda") for _ in range(2))
    for _ in range(5):
        plain_loss = engine.step(plain)
    monkeypatch.setattr(fastgrok.families.mlp, "GPU_PAD_BELOW", 1 << 30)
    for _ in range(5):
        padded_loss = engine.step(padded)
    assert_close("losses", padded_loss, plain_loss, atol=1e-6, rtol=1e-5)
    for name in ("U", "V", "W"):
        assert_close(name, getattr(padded, name), getattr(plain, name), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scatter", ["window", "block"])
def test_deterministic_and_together_equals_alone_at_real_size(scatter):
    """Two runs of 1024 models give the same bits, and models 7 (dropout) and 800 trained alone the same losses at
    every step and the same U, V, W as in the population."""
    hypers = grid()

    def train(hs):
        pop, engine = Population(hs, Settings(p=P), "cuda"), TRITON_STEPS[scatter]("tf32")
        return pop, torch.stack([engine.step(pop) for _ in range(3)])

    (pop, losses), (again, losses_again) = train(hypers), train(hypers)
    assert torch.equal(losses, losses_again)
    for name in ("U", "V", "W"):
        assert torch.equal(getattr(pop, name), getattr(again, name)), name
    for b in (7, 800):
        alone, alone_losses = train([hypers[b]])
        assert torch.equal(losses[:, b], alone_losses[:, 0]), f"losses[{b}]"
        for name in ("U", "V", "W"):
            assert torch.equal(getattr(pop, name)[b], getattr(alone, name)[0]), f"{name}[{b}]"


@pytest.mark.parametrize("scatter", ["window", "block"])
@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "bf16"])
def test_low_precision_by_the_error_ratio_rule(precision, scatter):
    assert_gradients_by_the_error_ratio_rule(Population(grid(models=64), Settings(p=P), "cuda"),
                                             TRITON_STEPS[scatter](precision))


@pytest.mark.parametrize("scatter", ["window", "block"])
def test_bf16_backward_reads_g_stored_in_bf16_as_it_would_round_fp32_g(scatter):
    """In bf16 the forward stores G in bf16 (kernels/layout.py g_dtype), which is exact only if the backward's
    dots round an fp32 G to the same bf16 numbers torch's round-to-nearest-even gives: bit for bit the same
    gradients from an fp32 G and from its bf16 copy in the forward's padded rows."""
    from fastgrok.kernels.layout import g_row

    pop = Population(grid(models=64), Settings(p=P), "cuda")
    engine = TRITON_STEPS[scatter]("bf16")
    data = engine.step_data(pop)
    G = engine.forward(pop, data)[1]
    assert G.dtype == torch.bfloat16 and G.stride(1) == g_row(P, "bf16") == 104
    g32 = torch.randn(G.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 1e-3
    g16 = torch.zeros(*G.shape[:2], g_row(P, "bf16"), device="cuda", dtype=torch.bfloat16)
    g16[..., :P] = g32
    for name, a, b in zip(("dU", "dV", "dW"), engine.backward(pop, data, g32), engine.backward(pop, data, g16[..., :P])):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("p", [131, 300])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "tf32x3", "bf16"])
def test_p_above_128_launches_in_every_precision(precision, p):
    """p 131 and 300 pad to P 256 and 512 inside the kernels, where the launchers shrink the tiles to fit shared
    memory (kernels/layout.py fit): without that the default tf32 backward at p 300 asked for 400 KB of the
    H100's 227 KB and could not launch. Gradients by the error-ratio rule (fp32: against torch in fp32)."""
    assert_gradients_by_the_error_ratio_rule(Population(grid(models=16), Settings(p=p), "cuda"), TritonBackend(precision))


def assert_gradients_by_the_error_ratio_rule(pop, engine):
    precision = engine.precision
    data = engine.step_data(pop)
    data["masks"] = None  # the reference below has no dropout
    ours = engine.backward(pop, data, engine.forward(pop, data)[1])
    args = (pop.train_x, pop.train_y, pop.valid, data["D"].double(), None, "quad", "mse")
    ref64 = one_hot.grads((pop.U.double(), pop.V.double()), pop.W.double(), *args)[1:]
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        # torch's closest to tf32x3 is fp32
        torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            same = one_hot.grads((pop.U, pop.V), pop.W, *args[:3], data["D"], None, "quad", "mse")[1:]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    for name, x, t, r in zip(("dU", "dV", "dW"), ours, same, ref64):
        err, err_torch = (x.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * err_torch + 1e-7, f"{name} {precision}: error {err:.3e} vs torch's {err_torch:.3e}"
