"""The Triton backend against reference.py. Without a GPU the kernels run in Triton's interpreter (conftest.py),
so shapes stay small: p <= 13, N <= 32, B <= 4, with odd sizes (p 13, N 23, B 1 and 3)."""

import pytest
import torch

pytest.importorskip("triton")

from compare import assert_close  # noqa: E402
from philox import dropout_mask  # noqa: E402

from fastgrok import reference  # noqa: E402
from fastgrok.backends import TorchBackend  # noqa: E402
from fastgrok.families.mlp_triton import TritonBackend  # noqa: E402
from fastgrok.bench import TRITON_STEPS, TritonBlockBackend  # noqa: E402
from fastgrok.config import Hyper, Settings  # noqa: E402
from fastgrok.data import batch_slots  # noqa: E402
from fastgrok.population import Population  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P, WIDTH = 13, 23


def hypers(width=WIDTH, dropout=0.25):
    return [
        Hyper(xi=0.3, alpha=0.5, width=width, wd=1.0, lr=1e-2, seed=1),
        Hyper(xi=0.0, alpha=0.7, width=width, wd=0.0, lr=3e-3, seed=2),
        Hyper(xi=0.6, alpha=0.35, width=width, wd=5.0, lr=2e-2, seed=3, dropout=dropout),
    ]


class Reference:
    """Each model of a population as reference.py modules; dropout masks rebuilt from the kernels' Philox."""

    def __init__(self, pop):
        s = pop.settings
        self.pop, self.models = pop, []
        for b, h in enumerate(pop.hypers):
            mlp = pop.model(b)
            d = int(pop.D[b])
            data = [*pop.train_x[:, b, :d].cpu(), pop.train_y[b, :d].cpu()]
            self.models.append((mlp, reference.make_optimizer(mlp, s.optimizer, h.lr, h.wd, s.betas, s.eps), *data))

    def mask(self, b, step):
        h, (_, _, m, n, _) = self.pop.hypers[b], self.models[b]
        pairs = m * self.pop.settings.p + n
        return dropout_mask(int(self.pop.dropout_seed[b]), step, h.dropout, pairs, h.width) if h.dropout else None

    def step(self, step):
        return [reference.train_step(mlp, opt, (m, n), y, self.pop.settings.loss, self.mask(b, step))
                for b, (mlp, opt, m, n, y) in enumerate(self.models)]


@pytest.mark.parametrize("act", ["quad", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_one_step_matches_reference(act, loss, optimizer):
    from fastgrok.kernels.backward import backward, tile_order
    from fastgrok.kernels.forward import forward
    from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

    pop = Population(hypers(), Settings(p=P, act=act, loss=loss, optimizer=optimizer), DEVICE)
    ref = Reference(pop)
    engine = TritonBackend("fp32")
    data = engine.step_data(pop)
    example_loss, G, _ = forward(pop.U, pop.V, pop.W, data["m"], data["n"], data["y"], data["count"], act=ACT_CODES[act],
                                 loss=LOSS_CODES[loss], precision="fp32", train=True, dropout=data["masks"])
    grads = {"window": backward(pop.U, pop.V, pop.W, data["m"], data["n"], data["count"], G, act=ACT_CODES[act],
                                precision="fp32", dropout=data["masks"])}
    block = TritonBlockBackend("fp32")  # its own example order, so its own forward
    block_data = block.step_data(pop)
    grads["block"] = block.backward(pop, block_data, block.forward(pop, block_data)[1])
    for b, (mlp, opt, m, n, y) in enumerate(ref.models):
        mlp.train()
        out = mlp(m, n, mask=ref.mask(b, 0))
        out.retain_grad()
        per_example = reference.per_example_loss(out, y, loss)
        per_example.mean().backward()
        order = tile_order(*pop.batch()[0], pop.valid, P)[b, : m.numel()].cpu()  # the kernels' example order
        assert_close(f"loss[{b}]", example_loss[b, : m.numel()], per_example[order])
        assert_close(f"G[{b}]", G[b, : m.numel()], out.grad[order])
        for scatter, (dU, dV, dW) in grads.items():
            assert_close(f"dU[{b}] ({scatter})", dU[b], mlp.U.grad.T)
            assert_close(f"dV[{b}] ({scatter})", dV[b], mlp.V.grad.T)
            assert_close(f"dW[{b}] ({scatter})", dW[b], mlp.W.grad.T)
        mlp.zero_grad()
    engine.step(pop)
    ref.step(0)
    for b, (mlp, *_) in enumerate(ref.models):
        for name, ours, theirs in (("U", pop.U[b], mlp.U.T), ("V", pop.V[b], mlp.V.T), ("W", pop.W[b], mlp.W.T)):
            assert_close(f"{name}[{b}] after one step", ours, theirs)


def test_thirty_step_trajectory_with_dropout_and_per_model_hyperparameters():
    pop = Population(hypers(), Settings(p=P), DEVICE)
    ref = Reference(pop)
    engine = TritonBackend("fp32")
    for t in range(30):
        losses = engine.step(pop)
        expected = ref.step(t)
        for b, value in enumerate(expected):
            assert_close(f"loss[{b}] at step {t}", losses[b], torch.tensor(value))
    for b, (mlp, *_) in enumerate(ref.models):
        assert_close(f"U[{b}] after 30 steps", pop.U[b], mlp.U.T)
        assert_close(f"W[{b}] after 30 steps", pop.W[b], mlp.W.T)


@pytest.mark.parametrize("scatter", ["window", "block"])
def test_minibatch_trajectory_with_dropout_matches_reference(scatter):
    """Minibatches of 8 (fastgrok.data.batch_slots; model 2's epoch is 7 batches, so its order is redrawn
    within the run): every loss and the final weights. The kernels key dropout masks by pair, so a batch's
    masks are those of its pairs; the block scatter's order and offsets are made anew for every batch."""
    bs = 8
    pop = Population(hypers(), Settings(p=P, batch_size=bs), DEVICE)
    ref = Reference(pop)
    engine = TRITON_STEPS[scatter]("fp32")
    for t in range(12):
        losses = engine.step(pop)
        for b, (mlp, opt, m, n, y) in enumerate(ref.models):
            h = pop.hypers[b]
            slots = batch_slots(h.seed, m.numel(), bs, t)
            m_b, n_b = m[slots], n[slots]
            mask = dropout_mask(int(pop.dropout_seed[b]), t, h.dropout, m_b * P + n_b, h.width) if h.dropout else None
            value = reference.train_step(mlp, opt, (m_b, n_b), y[slots], "mse", mask)
            assert_close(f"loss[{b}] at step {t}", losses[b], torch.tensor(value))
    for b, (mlp, *_) in enumerate(ref.models):
        assert_close(f"U[{b}] after 12 steps", pop.U[b], mlp.U.T)
        assert_close(f"W[{b}] after 12 steps", pop.W[b], mlp.W.T)


def run(hs, steps, settings=None, fused=False, scatter="window"):
    """pop after `steps` steps of the Triton step with this scatter (fastgrok.bench.TRITON_STEPS)."""
    pop = Population(hs, settings or Settings(p=P), DEVICE)
    engine = TRITON_STEPS[scatter]("fp32", fused=fused)
    for _ in range(steps):
        engine.step(pop)
    return pop


@pytest.mark.parametrize("scatter", ["window", "block"])
def test_together_equals_alone_bit_for_bit(scatter):
    together = run(hypers(), 5, scatter=scatter)
    for b, h in enumerate(hypers()):
        alone = run([h], 5, scatter=scatter)
        for name in ("U", "V", "W"):
            assert torch.equal(getattr(together, name)[b], getattr(alone, name)[0]), f"{name}[{b}]"


def test_deterministic_and_fused_backward_agrees():
    a, b, fused = run(hypers(), 4), run(hypers(), 4), run(hypers(), 4, fused=True)
    block, block_fused = run(hypers(), 4, scatter="block"), run(hypers(), 4, fused=True, scatter="block")
    for name in ("U", "V", "W"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name), getattr(fused, name)), name
        assert torch.equal(getattr(block, name), getattr(block_fused, name)), name
        assert_close(f"{name}, block vs windowed scatter", getattr(block, name), getattr(a, name))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_model_is_frozen_and_isolated():
    hs = hypers()
    pop = Population(hs, Settings(p=P), DEVICE)
    pop.W[0, 2, 1] = float("inf")
    before = pop.U[0].clone()
    engine = TritonBackend("fp32")
    for _ in range(3):
        engine.step(pop)
    assert pop.diverged.tolist() == [True, False, False]
    assert torch.equal(pop.U[0], before)
    for b in (1, 2):
        alone = run([hs[b]], 3)
        assert torch.equal(pop.U[b], alone.U[0])


@pytest.mark.parametrize("width, models", [(8, 1), (32, 3)])
def test_evaluation_kernel_equals_torch_metrics(width, models):
    pop = run(hypers(width)[:models], 10)
    ours = pop.evaluate(TritonBackend("fp32"))
    theirs = pop.evaluate(TorchBackend())
    for k in ours:
        assert_close(k, ours[k], theirs[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block_d, block_n", [(16, 16), (64, 16), (16, 64)])
def test_tile_sizes_do_not_change_the_gradients(block_d, block_n):
    from fastgrok.kernels.backward import backward
    from fastgrok.kernels.forward import forward

    pop = Population(hypers(), Settings(p=P), DEVICE)
    data = TritonBackend("fp32").step_data(pop)

    def grads(**tiles):
        loss, G, _ = forward(pop.U, pop.V, pop.W, data["m"], data["n"], data["y"], data["count"], act=0, loss=0,
                             precision="fp32", train=True, dropout=data["masks"], **tiles)
        return (loss, *backward(pop.U, pop.V, pop.W, data["m"], data["n"], data["count"], G, act=0, precision="fp32",
                                dropout=data["masks"], **tiles))

    for name, ours, default in zip(("loss", "dU", "dV", "dW"), grads(block_d=block_d, block_n=block_n), grads()):
        valid = pop.valid if name == "loss" else slice(None)
        assert_close(f"{name} with tiles {block_d}x{block_n}", ours[valid], default[valid], atol=1e-7, rtol=1e-6)


def test_p_above_128_shrinks_the_tiles_and_still_matches_reference():
    """p 131 pads to P 256 inside the kernels, where the launchers halve the tiles to fit shared memory
    (kernels/layout.py fit; tests/test_kernel_compile.py checks the fit): one step with dropout, as reference.py.
    A larger p than the other interpreter tests, with few examples (alpha 0.02, 0.03) to stay quick."""
    from fastgrok.kernels.forward import TILES
    from fastgrok.kernels.layout import fit

    assert fit(TILES["block_d"], TILES["block_n"], 131) == (TILES["block_d"] // 2, TILES["block_n"] // 2)
    pop = Population([Hyper(xi=0.2, alpha=0.02, width=20, seed=1),
                      Hyper(xi=0.0, alpha=0.03, width=20, wd=5.0, seed=2, dropout=0.25)], Settings(p=131), DEVICE)
    ref = Reference(pop)
    losses = TritonBackend("fp32").step(pop)
    for b, value in enumerate(ref.step(0)):
        assert_close(f"loss[{b}]", losses[b], torch.tensor(value))
    for b, (mlp, *_) in enumerate(ref.models):
        for name, ours, theirs in (("U", pop.U[b], mlp.U.T), ("V", pop.V[b], mlp.V.T), ("W", pop.W[b], mlp.W.T)):
            assert_close(f"{name}[{b}] after one step at p 131", ours, theirs)


# the interpreter has no bf16 dots: bf16 runs where the kernels compile (the GPU)
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="the interpreter has no bf16 dots"))])
def test_memory_estimate_covers_what_a_triton_step_holds(precision):
    from fastgrok.data import task_table
    from fastgrok.kernels.forward import forward, transposed_weights
    from fastgrok.kernels.layout import g_row, words
    from fastgrok.planner import bytes_per_model

    pop = Population(hypers(), Settings(p=P), DEVICE)
    engine = TritonBackend(precision)
    engine.step(pop)
    held = [t for t in vars(pop).values() if isinstance(t, torch.Tensor)]
    held += [t for lst in (pop.exp_avg, pop.exp_avg_sq) for t in lst]  # (the pair table is shared, not per model)
    data = engine.step_data(pop)
    held += [t for t in data.values() if isinstance(t, torch.Tensor)] + [data["masks"][0]]  # one model has dropout
    loss, G, _ = forward(pop.U, pop.V, pop.W, data["m"], data["n"], data["y"], data["count"], act=0, loss=0,
                         precision=precision, train=True)
    # the step's losses, G (a view of padded rows: its whole storage), the forward's copy of W and the gradients
    transient = [loss, transposed_weights(pop.W, precision), *(torch.empty_like(t) for t in pop.tensors.values())]
    used = (sum(t.numel() * t.element_size() for t in held + transient) + G.untyped_storage().nbytes()) / len(pop)
    num_pairs = task_table("add", P)[1].numel()
    estimate = bytes_per_model(Settings(p=P), WIDTH, pop.train_y.shape[1], num_pairs, engine, dropout=True)
    assert used <= estimate <= 1.5 * used, (used, estimate)
    # one more example costs its row of G as the kernels pad it (kernels/layout.py g_row), its loss and three int32
    # indices (4 x 4 B), and its int64 training indices, label and valid flag (25 B);
    # with dropout its mask bits, a 4-byte word per 32 neurons (kernels/dropout.py)
    for p in (13, 97, 131):
        for precision, size in (("fp32", 4), ("bf16", 2)):
            engine = TritonBackend(precision)
            per_example = (bytes_per_model(Settings(p=p), 8, 1, 0, engine)
                           - bytes_per_model(Settings(p=p), 8, 0, 0, engine))
            assert per_example == size * g_row(p, precision) + 4 * 4 + 25, (p, precision)
    engine = TritonBackend("fp32")
    masks = [bytes_per_model(Settings(p=P), width, 1, 0, engine, dropout=True)
             - bytes_per_model(Settings(p=P), width, 1, 0, engine) for width in (8, 32, 70)]
    assert masks == [4 * words(8), 4 * words(32), 4 * words(70)] == [4, 4, 12]


def test_rows_in_memory_are_padded_to_16_bytes_with_zeros():
    """The kernels move rows in 16-byte vectors: alignment() must be exact (the kernels round their sizes down to
    it), the forward's copy of W must hold W and zeros, and G's padding past p must be written as zeros, since the
    backward reads it without a mask on p."""
    from fastgrok.kernels.forward import forward, transposed_weights
    from fastgrok.kernels.hidden import LOSS_CODES
    from fastgrok.kernels.layout import alignment, g_row

    assert [alignment(500, 97 * 500), alignment(512, 97 * 512), alignment(97), alignment(100, 4704 * 100)] == [4, 16, 1, 4]
    assert [g_row(97), g_row(97, "bf16"), g_row(8, "bf16"), g_row(13)] == [100, 104, 8, 16]
    W = torch.randn(3, WIDTH, P, generator=torch.Generator().manual_seed(0))
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        w_t = transposed_weights(W, precision)
        assert w_t.shape == (3, P, 32) and w_t.dtype == dtype
        assert torch.equal(w_t[..., :WIDTH], W.transpose(1, 2).to(dtype)) and not w_t[..., WIDTH:].any()
    for loss in ("mse", "ce"):
        pop = Population(hypers(), Settings(p=P, loss=loss), DEVICE)
        data = TritonBackend("fp32").step_data(pop)
        _, G, _ = forward(pop.U, pop.V, pop.W, data["m"], data["n"], data["y"], data["count"], act=0, loss=LOSS_CODES[loss],
                          precision="fp32", train=True, dropout=data["masks"])
        assert G.shape[-1] == P and G.stride(1) == g_row(P) == 16
        rows = G.as_strided((*G.shape[:2], g_row(P)), G.stride())
        for b, count in enumerate(data["count"].tolist()):
            assert G[b, :count].abs().sum() > 0 and not rows[b, :count, P:].any(), (loss, b)


@pytest.mark.parametrize("scatter", ["window", "block"])
def test_populations_larger_than_one_grid_axis_are_launched_in_slices(monkeypatch, scatter):
    """Every launch (dropout masks, forward, backward, evaluation) goes through layout.launch, which slices the
    population at MAX_GRID_Y models: with 2, three models take two launches of each kernel."""
    from fastgrok.kernels import layout

    expected = run(hypers(), 2, scatter=scatter)
    monkeypatch.setattr(layout, "MAX_GRID_Y", 2)  # CUDA allows 65535 models per launch; here 2
    sliced = run(hypers(), 2, scatter=scatter)
    for name in ("U", "V", "W"):
        assert torch.equal(getattr(sliced, name), getattr(expected, name)), name
    assert torch.equal(sliced.evaluate(TritonBackend("fp32"))["test_acc"], expected.evaluate(TritonBackend("fp32"))["test_acc"])


def test_tile_order_keeps_the_windowed_scatter_to_a_few_windows_per_tile():
    """The FLOP saving docs/performance.md predicts: at p 97, alpha 0.5, a tile of 32 examples in tile order spans
    about 2.5 windows of 16 rows of dU and dV together, against 2 x 128 / 16 = 16 for the full one-hot dots."""
    from fastgrok.kernels.backward import tile_order

    pop = Population([Hyper(xi=0.2, alpha=a, width=8, seed=s) for s, a in enumerate((0.5, 0.5, 0.3))], Settings(p=97))
    order = tile_order(*pop.train_x, pop.valid, 97)
    windows, tiles = 0, 0
    for b in range(2):  # the alpha 0.5 models
        d = int(pop.D[b])
        assert sorted(order[b, :d].tolist()) == list(range(d))  # a permutation of the training slots...
        assert sorted(order[2, int(pop.D[2]):].tolist()) == list(range(int(pop.D[2]), pop.valid.shape[1]))  # ...padding last
        for rows in (pop.train_x[0, b, order[b, :d]], pop.train_x[1, b, order[b, :d]]):
            windows += sum((int(t.max()) - int(t.min())) // 16 + 1 for t in rows.split(32))
        tiles += -(-d // 32)
    assert windows / tiles <= 2.6, windows / tiles
    shuffled = sum((int(t.max()) - int(t.min())) // 16 + 1 for t in pop.train_x[0, 0, : int(pop.D[0])].split(32))
    assert shuffled / -(-int(pop.D[0]) // 32) >= 5  # the population's own (random) order would need full dots


@pytest.mark.parametrize("in_tile_order", [True, False])
def test_windowed_scatter_matches_reference_over_many_windows(in_tile_order):
    """p 37 > 16 rows, so dU and dV take several windows per tile (many more in the population's random order)."""
    from fastgrok.kernels.backward import backward
    from fastgrok.kernels.forward import forward

    p = 37
    pop = Population(hypers(width=8)[:2], Settings(p=p), DEVICE)
    ref = Reference(pop)
    data = TritonBackend("fp32").step_data(pop)
    train = {"m": pop.train_x[0], "n": pop.train_x[1], "y": pop.train_y}
    m, n, y = (data[k] if in_tile_order else train[k].int() for k in ("m", "n", "y"))
    _, G, _ = forward(pop.U, pop.V, pop.W, m, n, y, data["count"], act=0, loss=0, precision="fp32", train=True)
    dU, dV, _ = backward(pop.U, pop.V, pop.W, m, n, data["count"], G, act=0, precision="fp32")
    for b, (mlp, _, rm, rn, ry) in enumerate(ref.models):
        reference.per_example_loss(mlp(rm, rn), ry, "mse").mean().backward()
        assert_close(f"dU[{b}]", dU[b], mlp.U.grad.T)
        assert_close(f"dV[{b}]", dV[b], mlp.V.grad.T)


def test_block_scatter_and_forward_match_over_many_and_empty_blocks():
    """p 37: 2 x 2 blocks of 19 rows. Model 0 has examples everywhere (several tiles of 16 per block), model 1 only
    in the first block (three blocks empty), model 2 none; dropout on, 23 neurons in chunks of 16 (some masked).
    The block scatter against the windowed one, the block forward against the per-example one."""
    from fastgrok.kernels import block
    from fastgrok.kernels.backward import backward
    from fastgrok.kernels.block import block_count, block_order, block_side
    from fastgrok.kernels.dropout import masks
    from fastgrok.kernels.forward import forward

    p, width, d_max = 37, 23, 300
    assert (block_side(p), block_count(p)) == (19, 2)
    gen = torch.Generator().manual_seed(0)
    pairs = [torch.randperm(p * p, generator=gen)[:d_max], torch.randperm(19 * 19, generator=gen)[:40]]
    m = torch.zeros(3, d_max, dtype=torch.int64)
    n = torch.zeros(3, d_max, dtype=torch.int64)
    count = torch.tensor([d_max, 40, 0])
    pairs[1] = pairs[1] // 19 * p + pairs[1] % 19  # rows and columns below 19
    for b, pr in enumerate(pairs):
        m[b, : len(pr)], n[b, : len(pr)] = pr // p, pr % p
    valid = torch.arange(d_max)[None, :] < count[:, None]
    order, blocks = block_order(m, n, valid, p)
    assert blocks[:, -1].tolist() == count.tolist() and blocks[1, 1:].tolist() == [40] * 4
    m, n = (torch.gather(t, 1, order).int().to(DEVICE) for t in (m, n))
    for b in range(2):  # every block's slots hold its own pairs
        for j in range(4):
            lo, hi = int(blocks[b, j]), int(blocks[b, j + 1])
            assert ((m[b, lo:hi] // 19 == j // 2) & (n[b, lo:hi] // 19 == j % 2)).all()
    U, V, W = (torch.randn(3, *s, generator=gen).to(DEVICE) for s in ((p, width), (p, width), (width, p)))
    G = torch.randn(3, d_max, p, generator=gen).to(DEVICE)
    constants = (torch.tensor([5, 6, 7]), torch.full((3,), 2**30), torch.full((3,), 4 / 3))
    count, blocks = count.int().to(DEVICE), blocks.to(DEVICE)
    dropout = masks(m, n, count, tuple(t.to(DEVICE) for t in constants), p=p, width=width, step=2)
    tiles = dict(block_d=16, block_n=16)
    expected = backward(U, V, W, m, n, count, G, act=1, precision="fp32", dropout=dropout, **tiles)
    # the interpreter computes tf32 dots exactly, so on the CPU it also checks tf32's own code (the fused kernel
    # reads G a second time, transposed, unless told to read it once); on a GPU tests/test_gpu.py holds tf32 to the
    # error-ratio rule
    # (and a chunk of 128 neurons, 4 words of dropout bits of which the model has 1, as bench/sweep_blocks.py WIDE_N)
    runs = [("fp32", False, True, 16), ("fp32", True, True, 16), ("fp32", True, True, 128)]
    runs += [("tf32", True, True, 16), ("tf32", True, False, 16)] if DEVICE == "cpu" else []
    for precision, fused, g_twice, block_n in runs:
        ours = block.backward(U, V, W, m, n, count, G, blocks, act=1, precision=precision, dropout=dropout,
                              fused=fused, g_twice=g_twice, **{**tiles, "block_n": block_n})
        for name, a, b in zip(("dU", "dV", "dW"), ours, expected):
            # the same sums in another order: rounding relative to the largest terms
            assert_close(f"{name} (block scatter, {precision}, fused {fused}, G twice {g_twice}, {block_n} neurons)",
                         a, b, atol=1e-6 * float(b.abs().max()), rtol=1e-5)
    assert not ours[0][2].any() and ours[0][1, 19:].abs().sum() == 0  # no examples: no gradient

    # the forward walks the same blocks, reading U, V rows from a window per block: the same losses, G and
    # predictions as one load per example (the window holds the rows, exactly), on the valid slots
    y = torch.randint(0, p, m.shape, generator=gen).int().to(DEVICE)
    valid = valid.to(DEVICE)
    for train, loss in ((True, 0), (True, 1), (False, 0)):
        kw = dict(act=0, loss=loss, precision="fp32", train=train, dropout=dropout if train else None, **tiles)
        for name, a, b in zip(("loss", "G", "pred"), block.forward(U, V, W, m, n, y, count, blocks, **kw),
                              forward(U, V, W, m, n, y, count, **kw)):
            if b is not None:
                assert_close(f"{name} (block forward, train {train}, loss {loss})", a[valid], b[valid], atol=1e-6)


@pytest.mark.parametrize("width", [23, 64, 70])
def test_dropout_masks_are_the_philox_draws_of_each_pair_and_neuron(width):
    """The step's masks, drawn once into bits (kernels/dropout.py): bit k % 32 of word k // 32 of slot d is
    tests/philox.py's draw for pair m_d p + n_d and neuron k, at widths that end inside a word (23, 70) or on one
    (64), for rates 0 (all kept), 0.25 and 0.9, on every slot a model has."""
    from fastgrok.kernels.dropout import masks
    from fastgrok.kernels.layout import words

    gen = torch.Generator().manual_seed(width)
    p, d_max, count = 11, 40, torch.tensor([40, 7, 0])
    m, n = (torch.randint(0, p, (3, d_max), generator=gen, dtype=torch.int32) for _ in range(2))
    rates = [0.0, 0.25, 0.9]
    constants = (torch.tensor([3, 2**32 + 5, 11]), torch.tensor([round(r * 2**32) for r in rates]),
                 torch.tensor([1 / (1 - r) for r in rates]))
    bits, inv_keep = masks(m.to(DEVICE), n.to(DEVICE), count.int().to(DEVICE), tuple(t.to(DEVICE) for t in constants),
                           p=p, width=width, step=5)
    assert bits.shape == (3, words(width), d_max) and torch.equal(inv_keep.cpu(), constants[2])
    k = torch.arange(width)
    for b, rate in enumerate(rates):
        d = int(count[b])
        kept = (bits[b, k // 32, :d].cpu().T >> (k % 32)) & 1  # (d, width)
        expected = dropout_mask(int(constants[0][b]) & 0xFFFFFFFF, 5, rate, m[b, :d] * p + n[b, :d], width) > 0
        assert torch.equal(kept.bool(), expected), b
