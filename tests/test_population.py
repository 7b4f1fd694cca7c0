"""The torch backend against reference.py: one step (every gradient and updated tensor), trajectories,
B models together == each alone, NaN isolation, and the evaluation metrics."""

import os
import subprocess
import sys

import pytest
import torch

from compare import assert_close
from fastgrok import process, reference
from fastgrok.backends import TorchBackend, finite_models
from fastgrok.families import mlp as one_hot
from fastgrok.config import Hyper, Settings
from fastgrok.data import batch_slots, generator
from fastgrok.errors import ConfigError
from fastgrok.population import Population

P = 13


def reference_models(pop):
    """Each model of `pop` as a reference MLP + torch optimizer + its training data."""
    s, out = pop.settings, []
    for b, h in enumerate(pop.hypers):
        mlp = pop.model(b)
        opt = reference.make_optimizer(mlp, s.optimizer, h.lr, h.wd, s.betas, s.eps)
        d = int(pop.D[b])
        gen = generator(h.seed, "dropout") if h.dropout > 0 else None
        out.append((mlp, opt, *pop.train_x[:, b, :d], pop.train_y[b, :d], gen))
    return out


def reference_step(mlp, opt, m, n, y, gen, loss):
    mask = reference.dropout_mask((m.numel(), mlp.U.shape[0]), mlp.dropout, gen) if gen is not None else None
    return reference.train_step(mlp, opt, (m, n), y, loss, mask)


def mixed_hypers(width=16):
    return [
        Hyper(xi=0.3, alpha=0.5, width=width, wd=1.0, lr=1e-2, seed=1),
        Hyper(xi=0.0, alpha=0.7, width=width, wd=0.0, lr=3e-3, seed=2),
        Hyper(xi=0.6, alpha=0.35, width=width, wd=5.0, lr=2e-2, seed=3, dropout=0.2),
    ]


@pytest.mark.parametrize("act", ["quad", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_one_step_matches_reference(act, loss, optimizer):
    settings = Settings(p=P, act=act, loss=loss, optimizer=optimizer)
    pop = Population(mixed_hypers(), settings)
    refs = reference_models(pop)
    D = pop.D.float()
    # gradients: the hand-written backward against autograd through the reference module
    masks = torch.ones(len(pop), pop.train_y.shape[1], pop.width)  # what the first step draws
    for b, (mlp, opt, m, n, y, gen) in enumerate(refs):
        if gen is not None:
            masks[b, : m.numel()] = reference.dropout_mask((m.numel(), pop.width), mlp.dropout, generator(pop.hypers[b].seed, "dropout"))
    losses, dU, dV, dW = one_hot.grads((pop.U, pop.V), pop.W, pop.train_x, pop.train_y, pop.valid, D, masks, act, loss)
    for b, (mlp, opt, m, n, y, gen) in enumerate(refs):
        mask = masks[b, : m.numel()]
        mlp.train()
        value = reference.per_example_loss(mlp(m, n, mask=mask), y, loss).mean()
        value.backward()
        assert_close(f"loss[{b}]", losses[b], value)
        assert_close(f"dU[{b}]", dU[b], mlp.U.grad.T)
        assert_close(f"dV[{b}]", dV[b], mlp.V.grad.T)
        assert_close(f"dW[{b}]", dW[b], mlp.W.grad.T)
        mlp.zero_grad()
    # a full step: every updated parameter
    TorchBackend().step(pop)
    for b, (mlp, opt, m, n, y, gen) in enumerate(refs):
        reference_step(mlp, opt, m, n, y, gen, loss)
        for name, ours, theirs in (("U", pop.U[b], mlp.U.T), ("V", pop.V[b], mlp.V.T), ("W", pop.W[b], mlp.W.T)):
            assert_close(f"{name}[{b}] after step", ours, theirs)


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_fifty_step_trajectory(optimizer):
    settings = Settings(p=P, optimizer=optimizer)
    pop = Population(mixed_hypers(), settings)
    refs = reference_models(pop)
    engine = TorchBackend()
    for t in range(50):
        losses = engine.step(pop)
        for b, (mlp, opt, m, n, y, gen) in enumerate(refs):
            value = reference_step(mlp, opt, m, n, y, gen, "mse")
            assert_close(f"loss[{b}] at step {t}", losses[b], torch.tensor(value))
    for b, (mlp, *_ ) in enumerate(refs):
        assert_close(f"U[{b}] after 50 steps", pop.U[b], mlp.U.T)
        assert_close(f"W[{b}] after 50 steps", pop.W[b], mlp.W.T)


@pytest.mark.parametrize("batchnorm,batch_size,act,loss", [
    (True, None, "quad", "mse"), (True, 8, "quad", "mse"), (True, 8, "relu", "ce"), (False, 8, "quad", "mse")])
def test_minibatches_and_batchnorm_follow_the_reference(batchnorm, batch_size, act, loss):
    """30 steps (per-model alpha, lr, wd, dropout): every loss, then every parameter and BatchNorm's running
    statistics, against reference modules stepped on the batches of fastgrok.data.batch_slots. Full-batch
    BatchNorm takes its statistics over each model's own training set, not the padding."""
    settings = Settings(p=P, act=act, loss=loss, batchnorm=batchnorm, batch_size=batch_size)
    pop = Population(mixed_hypers(), settings)
    refs = reference_models(pop)
    engine = TorchBackend()
    for t in range(30):
        losses = engine.step(pop)
        for b, (mlp, opt, m, n, y, gen) in enumerate(refs):
            slots = slice(None) if batch_size is None else batch_slots(pop.hypers[b].seed, m.numel(), batch_size, t)
            value = reference_step(mlp, opt, m[slots], n[slots], y[slots], gen, loss)
            assert_close(f"loss[{b}] at step {t}", losses[b], torch.tensor(value))
    for b, (mlp, *_) in enumerate(refs):
        theirs = {"U": mlp.U.T, "V": mlp.V.T, "W": mlp.W.T}
        if batchnorm:
            theirs |= {"bn_weight": mlp.bn.weight, "bn_bias": mlp.bn.bias, "running_mean": mlp.bn.running_mean,
                       "running_var": mlp.bn.running_var}
        for name, tensor in theirs.items():
            assert_close(f"{name}[{b}] after 30 steps", getattr(pop, name)[b], tensor)


def test_minibatches_visit_every_training_example_once_an_epoch():
    size, bs = 30, 8  # 3 full batches an epoch, 6 examples left out of each
    epochs = [torch.cat([batch_slots(5, size, bs, step) for step in range(3 * e, 3 * e + 3)]) for e in range(3)]
    for slots in epochs:
        assert slots.numel() == 24 and len(set(slots.tolist())) == 24 and slots.max() < size
    assert len({tuple(s.tolist()) for s in epochs}) == 3  # reshuffled every epoch
    assert not torch.equal(batch_slots(5, size, bs, 0), batch_slots(6, size, bs, 0))  # each seed its own order
    # a population's batch is its models' batch_slots, whatever the other models' epochs
    pop = Population(mixed_hypers(), Settings(p=P, batch_size=bs))
    for step in (0, 5, 11, 4):
        pop.step = step
        (m, n), y, valid, D = pop.batch()
        assert valid.all() and D.tolist() == [bs] * 3
        for b, h in enumerate(pop.hypers):
            slots = batch_slots(h.seed, int(pop.D[b]), bs, step)
            assert torch.equal(y[b], pop.train_y[b, slots]) and torch.equal(m[b], pop.train_x[0, b, slots])


def test_minibatch_and_batchnorm_settings_are_checked():
    with pytest.raises(ConfigError, match="larger than the training set of alpha 0.35"):
        Population(mixed_hypers(), Settings(p=P, batch_size=70))
    with pytest.raises(ConfigError, match="at least 2 with BatchNorm"):
        Settings(p=P, batch_size=1, batchnorm=True).check()
    from fastgrok.backends import make_backend
    from fastgrok.families.mlp_triton import TritonBackend

    with pytest.raises(ConfigError, match="BatchNorm runs on --backend torch"):
        TritonBackend().check(Settings(batchnorm=True))
    # auto never picks the kernels for BatchNorm, even on a GPU
    assert make_backend("auto", torch.device("cuda"), settings=Settings(batchnorm=True)).name == "torch"


def test_auto_takes_torch_for_a_p_the_kernels_do_not_take():
    """The kernels take p up to TritonBackend.MAX_P; above it auto trains on torch (any p), triton is refused."""
    from fastgrok.backends import make_backend
    from fastgrok.families.mlp_triton import TritonBackend
    from fastgrok.bench import check_variant

    cuda, big = torch.device("cuda"), Settings(p=TritonBackend.MAX_P + 1)
    assert make_backend("auto", cuda, settings=big).name == "torch"
    assert make_backend("auto", cuda, settings=Settings(p=TritonBackend.MAX_P)).name.startswith("triton")
    with pytest.raises(ConfigError, match="the triton backend handles p up to 512"):
        TritonBackend().check(big)
    with pytest.raises(ConfigError, match="handles p up to 512"):  # bench says so before building anything
        check_variant("triton-tf32", big, 8, 0.5, torch.device("cpu"))


def train(pop, steps):
    engine = TorchBackend()
    for _ in range(steps):
        engine.step(pop)
    return pop


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_finite_models_flags_a_nan_or_inf_anywhere_and_nothing_else(device):
    """The divergence check reads a model's largest |x|: NaN and inf must survive the (vectorised) reduction
    wherever they sit, and finite values near the float32 limit must not be flagged."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (6, 97, 500), (5, 500, 97)]:
        g = torch.randn(shape, generator=gen)
        g[2].fill_(3e38)
        bad = {0: float("nan"), 3: float("inf"), 4: -float("inf")}
        for b, value in bad.items():
            g[b].view(-1)[int(torch.randint(g[b].numel(), (1,), generator=gen))] = value
        g[1].view(-1)[-1] = float("nan")  # the last element, in a vector loop's tail
        expected = torch.isfinite(g).flatten(1).all(1)
        assert expected.tolist() == [False, False, True, False, False] + [True] * (shape[0] - 5)
        assert torch.equal(finite_models(g.to(device)).cpu(), expected), shape


@pytest.mark.parametrize("settings", [Settings(p=P), Settings(p=P, batch_size=8, batchnorm=True)])
def test_together_equals_alone(settings):
    hypers = mixed_hypers()
    together = train(Population(hypers, settings), 20)
    for b, h in enumerate(hypers):
        alone = train(Population([h], settings), 20)
        for name in set(together.weights()) - {"model"}:
            assert_close(f"{name}[{b}] together vs alone", getattr(together, name)[b], getattr(alone, name)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("act, loss", [("quad", "mse"), ("relu", "ce")])
def test_cpu_chunks_cut_to_their_own_training_sets_change_nothing(monkeypatch, act, loss):
    """On a CPU the torch backend steps chunks of models, each only up to its largest training set and drawing
    only its own dropout masks (model 2 has dropout), in spans of examples whose losses and gradients add up: the
    same result as one chunk in one pass."""
    import fastgrok.backends

    settings = Settings(p=P, act=act, loss=loss)
    hypers = mixed_hypers()
    assert len({h.alpha for h in hypers}) > 1
    whole = train(Population(hypers, settings), 10)
    whole_loss = TorchBackend().step(whole)  # the 11th step's losses
    monkeypatch.setattr(fastgrok.backends, "CPU_CHUNK_BYTES", 1)  # one model per chunk, spans of 16 examples
    chunked = train(Population(hypers, settings), 10)
    assert_close("losses, one model per chunk", TorchBackend().step(chunked), whole_loss, atol=1e-6, rtol=1e-6)
    for name in ("U", "V", "W"):
        assert_close(f"{name}, one model per chunk", getattr(chunked, name), getattr(whole, name), atol=1e-6, rtol=1e-6)


FAULTS_PER_STEP = """
import resource, sys
from fastgrok import process
from fastgrok.backends import TorchBackend
from fastgrok.config import Hyper, Settings
from fastgrok.population import Population
if sys.argv[1] == "glibc":
    process.CPU_MALLOC = {}
process.tune_cpu_malloc()  # as a run on the CPU does when it starts
pop = Population([Hyper(width=128, xi=x / 20, wd=w) for x in range(13) for w in (0, 5, 15)], Settings(p=47))
engine = TorchBackend()
for _ in range(3):
    engine.step(pop)
per_step = []
for _ in range(5):  # the least of five blocks of four steps: a step now and then grows the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        engine.step(pop)
    per_step.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
print(min(per_step))
"""


@pytest.mark.skipif(process.glibc_mallopt() is None, reason="glibc's malloc settings")
def test_a_cpu_step_does_not_fault_its_buffers_in_again():
    """glibc's malloc, left to itself, gave a step's freed buffers back to the kernel and faulted them in again
    the next step (the cpu-demo: thousands of page faults a step, a third of its time); with CPU_MALLOC, which a
    run on the CPU sets, they stay. The cpu-demo's population, each way in a process of its own (mallopt cannot
    be undone); a user's own MALLOC_* variables would win, so none is passed on."""
    env = {k: v for k, v in os.environ.items() if not process.malloc_variable(k)}
    faults = {way: float(subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, way], env=env, check=True,
                                        capture_output=True, text=True).stdout) for way in ("fastgrok", "glibc")}
    # ten pairs of runs on the 2-core machine: 0 against 1,658-10,500; with CPU_MALLOC empty both take thousands
    assert faults["fastgrok"] * 50 < faults["glibc"], faults


@pytest.mark.parametrize("act, loss", [("quad", "mse"), ("relu", "ce")])
def test_cpu_output_padding_changes_nothing(monkeypatch, act, loss):
    """On a CPU a p below CPU_PAD_BELOW (P = 13 here) gets zero output columns up to a multiple of 8: the same
    losses and parameters as without them (the path a GPU or a larger p takes)."""
    settings = Settings(p=P, act=act, loss=loss)
    assert P % 8 and P < one_hot.CPU_PAD_BELOW
    padded = train(Population(mixed_hypers(), settings), 10)
    padded_loss = TorchBackend().step(padded)
    monkeypatch.setattr(one_hot, "CPU_PAD_BELOW", 0)
    plain = train(Population(mixed_hypers(), settings), 10)
    assert_close("losses", padded_loss, TorchBackend().step(plain), atol=1e-6, rtol=1e-6)
    for name in ("U", "V", "W"):
        assert_close(name, getattr(padded, name), getattr(plain, name), atol=1e-6, rtol=1e-6)
    assert_close("W's second moment", padded.exp_avg_sq[2], plain.exp_avg_sq[2], atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_optimizer_leaves_a_frozen_model_exactly_as_it_was_and_moves_the_others_as_alone(name):
    """optim.step_ updates in place, then puts back the models whose `active` flag is off: their parameters and
    moments are bit for bit what they were (even with NaN gradients), and every other model's are bit for bit
    what a step without the frozen one gives."""
    from fastgrok import optim

    gen = torch.Generator().manual_seed(0)
    B, shape = 3, (5, 4)
    hyper = {k: torch.tensor(v) for k, v in dict(lr=[1e-2, 3e-3, 2e-2], wd=[1.0, 0.0, 5.0], beta1=[0.9] * 3,
                                                 beta2=[0.98, 0.99, 0.98], eps=[1e-8] * 3).items()}
    start = [torch.randn(B, *shape, generator=gen) for _ in range(3)]  # param, exp_avg, exp_avg_sq (abs below)
    grads = [torch.randn(B, *shape, generator=gen) for _ in range(3)]
    grads[0][1] = float("nan")  # model 1 diverged

    def run(models, active):
        param, m, v = (t[models].clone() for t in start)
        v.abs_()
        for step in (1, 2, 3):
            optim.step_(name, [param], [grads[step - 1][models]], [m], [v], step,
                        *(hyper[k][models] for k in ("lr", "wd", "beta1", "beta2", "eps")), active=active)
        return param, m, v

    together = run([0, 1, 2], torch.tensor([True, False, True]))
    alone = run([0, 2], torch.tensor([True, True]))
    before = (start[0][1], start[1][1], start[2][1].abs())
    for got, was in zip(together if name != "sgd" else together[:1], before):
        assert torch.equal(got[1], was)
    for got, want in zip(together, alone):
        assert torch.equal(got[[0, 2]], want)


def test_a_diverging_model_is_frozen_and_leaves_its_neighbours_alone():
    settings = Settings(p=P)
    hypers = mixed_hypers()
    pop = Population(hypers, settings)
    pop.U[1, 3, 0] = float("nan")
    frozen = pop.U[1].clone()
    train(pop, 10)
    assert pop.diverged.tolist() == [False, True, False]
    assert torch.equal(pop.U[1].isnan(), frozen.isnan())  # untouched, not updated with NaN everywhere
    metrics = pop.evaluate()
    for b in (0, 2):  # trained and evaluated as if alone
        alone = train(Population([hypers[b]], settings), 10)
        assert_close(f"U[{b}] beside a NaN model", pop.U[b], alone.U[0], atol=1e-6, rtol=1e-6)
        for k, v in alone.evaluate().items():
            assert_close(f"{k}[{b}] beside a NaN model", metrics[k][b], v[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("settings", [Settings(p=P), Settings(p=P, batch_size=8, batchnorm=True)])
def test_evaluate_matches_reference_accuracies(settings):
    """Every metric against reference modules in eval mode (BatchNorm: running statistics)."""
    pop = train(Population(mixed_hypers(), settings), 30)
    metrics = pop.evaluate(max_bytes=1)  # one model per chunk: the chunking path too
    (m_all, n_all), (z_all,) = pop.table
    for b in range(len(pop)):
        mlp = pop.model(b)
        d, c = int(pop.D[b]), int(pop.n_corrupt[b])
        train_idx, test_idx = pop.perm[b, :d], pop.perm[b, d:]
        y = pop.train_y[b, :d]
        m, n = m_all[train_idx], n_all[train_idx]
        assert metrics["train_acc"][b].item() == pytest.approx(reference.accuracy(mlp, (m, n), y))
        assert metrics["test_acc"][b].item() == pytest.approx(reference.accuracy(mlp, (m_all[test_idx], n_all[test_idx]), z_all[test_idx]))
        assert metrics["clean_acc"][b].item() == pytest.approx(reference.accuracy(mlp, (m[c:], n[c:]), y[c:]))
        if c:
            assert metrics["corrupted_acc"][b].item() == pytest.approx(reference.accuracy(mlp, (m[:c], n[:c]), y[:c]))
            assert metrics["inverted_acc"][b].item() == pytest.approx(reference.accuracy(mlp, (m[:c], n[:c]), z_all[train_idx][:c]))
        else:
            assert metrics["corrupted_acc"][b].isnan() and metrics["inverted_acc"][b].isnan()
        with torch.no_grad():
            ref_loss = reference.per_example_loss(mlp(m, n), y, "mse").mean().item()
        assert metrics["train_loss"][b].item() == pytest.approx(ref_loss, rel=1e-5)


def test_init_matches_the_paper():
    width = 500
    pop = Population([Hyper(width=width, seed=4)], Settings(p=97))
    std = 0.5 / (2 * width) ** (1 / 3)
    for t in (pop.U, pop.V, pop.W):
        assert t.std().item() == pytest.approx(std, rel=0.02)
        assert abs(t.mean().item()) < 0.01 * std * 10


def test_each_model_gets_the_weights_its_own_seed_draws():
    """Populations draw their models' weights on several threads; each model must still hold exactly what
    reference.init_weights draws from its own init stream, whatever its position."""
    from fastgrok.data import generator

    hypers = [Hyper(width=24, seed=s, alpha=a) for s, a in ((9, 0.3), (2, 0.8), (5, 0.5), (9, 0.5))]
    pop = Population(hypers, Settings(p=13))
    for b, h in enumerate(hypers):
        u, v, w = reference.init_weights(13, 24, generator(h.seed, "init"))
        assert torch.equal(pop.U[b], u.T) and torch.equal(pop.V[b], v.T) and torch.equal(pop.W[b], w.T), b


def test_plan_groups_by_width_and_puts_the_largest_training_sets_first():
    """Each population holds one width, as many models as the budget allows, largest training set first (a GPU
    then starts the longest backward programs first); every model lands in exactly one population."""
    from fastgrok.config import Grid
    from fastgrok.data import pair_count, train_size
    from fastgrok.planner import plan, population_bytes

    settings = Settings(p=13)
    grid = Grid.parse({"alpha": "0.3,0.9,0.1,0.5,0.7,0.2", "width": "8,16"})
    num_pairs = pair_count("add", 13)
    budget = population_bytes(settings, 16, train_size(num_pairs, 0.9), num_pairs, 4, TorchBackend(), device="cpu")
    populations = [p.ids() for p in plan(grid, settings, torch.device("cpu"), TorchBackend(), budget=budget)]
    hypers = grid.models()
    assert sorted(i for ids in populations for i in ids) == list(range(len(hypers)))
    assert [len(ids) for ids in populations][-2:] == [4, 2]  # the 16-wide models: 4 a population
    for ids in populations:
        assert len({hypers[i].width for i in ids}) == 1 and len(ids) <= 6
        sizes = [train_size(num_pairs, hypers[i].alpha) for i in ids]
        assert sizes == sorted(sizes, reverse=True)
    assert [hypers[i].alpha for i in populations[-1]] == [0.2, 0.1]


@pytest.mark.parametrize("seed", range(5))
def test_a_plan_is_the_grids_models_sorted_and_cut_without_listing_them(monkeypatch, seed):
    """The planner finds each population's models by arithmetic on the grid's axes; what it finds is the grid's
    models by width, then training-set size (largest first, alphas of equal size by model id), cut into
    populations of what fits: listed here the slow way, on grids of random axes."""
    import random

    from fastgrok.config import Grid
    from fastgrok.data import pair_count, train_size
    from fastgrok.planner import models_that_fit, plan

    rng = random.Random(seed)
    pick = lambda values: ",".join(rng.sample(values, rng.randint(1, len(values))))  # noqa: E731
    grid = Grid.parse({"xi": pick(["0", "0.2", "0.4"]), "alpha": pick(["0.3", "0.31", "0.5", "0.7", "0.9"]),
                       "width": pick(["8", "12", "16"]), "wd": pick(["0", "1"]), "dropout": pick(["0", "0.2"]),
                       "seed": pick(["0", "1", "2"])})
    settings, engine, cpu = Settings(p=13), TorchBackend(), torch.device("cpu")
    budget = rng.choice([10**6, 3 * 10**6, 10**8])
    hypers, pairs = grid.models(), pair_count("add", 13)
    expected = []
    for width in grid.axes["width"]:
        ids = sorted((i for i, h in enumerate(hypers) if h.width == width),
                     key=lambda i: -train_size(pairs, hypers[i].alpha))
        fits = models_that_fit(settings, width, train_size(pairs, hypers[ids[0]].alpha), pairs, cpu, budget, engine,
                               any(h.dropout > 0 for h in hypers))
        expected += [ids[k : k + fits] for k in range(0, len(ids), fits)]
    monkeypatch.setattr(Grid, "models", lambda self: pytest.fail("the planner listed the grid's models"))
    assert [p.ids() for p in plan(grid, settings, cpu, engine, budget)] == expected


def test_models_that_fit_is_the_most_models_within_the_budget():
    """The planner's count for a budget is the largest k with population_bytes(k) <= budget, where
    population_bytes grows by steps: on a CPU a wide model's activations are one piece's (cpu_pieces), shared by
    the population, and the evaluation is capped (eval_limit)."""
    from fastgrok.data import pair_count, train_size
    from fastgrok.planner import data_bytes, eval_limit, models_that_fit, population_bytes, tensor_bytes

    settings, pairs, engine = Settings(p=97), pair_count("add", 97), TorchBackend()
    d = train_size(pairs, 0.5)
    for device, width in (("cpu", 4096), ("cpu", 128), ("cuda", 512)):
        size = lambda k: population_bytes(settings, width, d, pairs, k, engine, device=device)  # noqa: E731
        for budget in (size(1), size(1) + 1, size(7) - 1, size(7), 3 * size(100) // 2):
            k = models_that_fit(settings, width, d, pairs, torch.device(device), budget, engine)
            assert size(k) <= budget < size(k + 1), (device, width, budget)
        with pytest.raises(ConfigError, match="one model of width"):
            models_that_fit(settings, width, d, pairs, torch.device(device), size(1) - 1, engine)
    # one model of p 97, N 4096 on a CPU: a piece of its examples at a time, not its whole (D, N) activations
    own = tensor_bytes(settings, 4096) + data_bytes(d, pairs)
    activations = one_hot.MLP.step_bytes(settings, 4096, d)
    assert population_bytes(settings, 4096, d, pairs, 1, engine, device="cpu") < own + activations // 2
    # on a GPU every model's activations at once, beside an evaluation capped at eval_limit and the task's table
    # (each pair's two operands and label, int64)
    assert population_bytes(settings, 4096, d, pairs, 10**4, engine, device="cuda") == (
        10**4 * (own + activations) + eval_limit("cuda") + 3 * 8 * pairs)


def test_evaluate_in_spans_of_pairs_gives_the_same_metrics(monkeypatch):
    """A model whose evaluation on all pairs does not fit max_bytes goes through its pairs in spans that do
    (each forward call within max_bytes); the metrics are those of one pass."""
    pop = train(Population(mixed_hypers(), Settings(p=P)), 30)
    whole = pop.evaluate()
    calls = []

    def spy(t, x, *args, **kwargs):
        calls.append(x.shape[1:])  # (models, pairs)
        return original(t, x, *args, **kwargs)

    original = one_hot.MLP.outputs
    monkeypatch.setattr(one_hot.MLP, "outputs", spy)
    per_example = one_hot.MLP.eval_bytes(pop.settings, pop.width)
    spans = pop.evaluate(max_bytes=20 * per_example)
    assert len(calls) == 3 * -(-P * P // 20) and all(models * pairs <= 20 for models, pairs in calls)
    for k in whole:
        assert_close(k, spans[k], whole[k], atol=1e-12, rtol=1e-12)  # NaN where whole has NaN


FLUSHED = """
import torch
from fastgrok.config import Grid, Settings
from fastgrok.train import train
tiny = torch.tensor([1e-39])  # a denormal float32
before = (tiny * 1.0).item()
train(Grid.of(width=4), Settings(p=5, steps=1), device="cpu", out=__import__("sys").argv[1])
print(before, (tiny * 1.0).item())
"""


def test_a_cpu_run_flushes_denormals_to_zero(tmp_path):
    """Weight decay drives weights and moments into denormal range, which x86 computes slowly (the cpu-demo's steps
    slowed 4.6x by step 2000): a run on the CPU flushes them to zero."""
    out = subprocess.run([sys.executable, "-c", FLUSHED, str(tmp_path / "run")], check=True, capture_output=True,
                         text=True).stdout.split()
    assert float(out[0]) > 0 and float(out[1]) == 0.0
