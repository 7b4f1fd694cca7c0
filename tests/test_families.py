"""The model-family seam: a family described in a few lines (here, in the tests only) trains, saves, loads, is
planned and analysed through the same code as the paper's MLP, which nothing generic names."""

import math

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from fastgrok import analysis, planner
from fastgrok.backends import TorchBackend, make_backend
from fastgrok.config import Grid, Settings
from fastgrok.errors import ConfigError
from fastgrok.families import FAMILIES, Family, Spec
from fastgrok.results import read_models, read_weights
from fastgrok.train import Interrupted, resume, train

P = 7


class Tables(nn.Module):
    """The toy's reference: logits A[m] + B[n]."""

    def __init__(self, A, B):
        super().__init__()
        self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())

    def forward(self, m, n):
        return self.A[m] + self.B[n]


class Toy(Family):
    """logits(m, n) = A[m] + B[n], two (p, p) tables: unit q is output q, its vectors A[:, q] and B[:, q]."""

    name = "toy"

    def tensors(self, settings, width):
        return {"A": Spec((settings.p, settings.p)), "B": Spec((settings.p, settings.p))}

    def init(self, settings, width, generator):
        return {k: 0.1 * torch.randn(settings.p, settings.p, generator=generator) for k in "AB"}

    def forward(self, t, x, settings, mask=None):
        m, n = x
        rows = lambda table, idx: torch.gather(table, 1, idx[..., None].expand(-1, -1, settings.p))  # noqa: E731
        return rows(t["A"], m) + rows(t["B"], n)

    def reference(self, settings, hyper, t):
        return Tables(t["A"], t["B"])

    def ipr_parts(self, t):
        return {"a": (t["A"], 1), "b": (t["B"], 1)}

    def prune(self, t, keep):
        return {k: v * keep[:, None, :] for k, v in t.items()}

    def units(self, settings, width):
        return settings.p

    def step_bytes(self, settings, width, d):
        return 4 * 4 * d * settings.p

    def eval_bytes(self, settings, width):
        return 4 * 3 * settings.p + 6 * 8

    def row_bytes(self, settings, width):
        return 4 * settings.p


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", Toy())
    return Settings(model="toy", p=P, steps=40, log_every=20, loss="ce", act="relu")


def test_a_family_of_a_few_lines_trains_saves_and_loads_through_the_generic_code(tmp_path, toy):
    grid = Grid.of(xi=[0.0, 0.3], seed=[0, 1], width=4)
    run = train(grid, toy, tmp_path / "run", device="cpu")
    assert run.status == "complete" and len(run.rows) == 4
    history = pq.read_table(tmp_path / "run" / "history").to_pydict()
    for m in range(4):  # the losses its autograd step (Family.grads' default) brought down
        losses = [loss for model, loss in zip(history["model"], history["train_loss"]) if model == m]
        assert losses[-1] < 0.9 * losses[0], (m, losses)
    (weights,) = read_weights(tmp_path / "run")
    assert sorted(weights) == ["A", "B", "model"] and weights["A"].shape == (4, P, P)  # the family's names
    pop = next(iter(__import__("fastgrok.results", fromlist=["x"]).load_populations(tmp_path / "run", models={2})))
    assert torch.equal(pop.A[0], weights["A"][2]) and torch.equal(pop.tensors["B"][0], weights["B"][2])
    rows = read_models(tmp_path / "run")
    assert pop.evaluate()["test_acc"][0].item() == pytest.approx(rows[2]["test_acc"])
    x, z = pop.table
    assert torch.equal(pop.model(0)(*x).argmax(-1), pop.family.forward(pop.tensors, x[:, None], toy)[0].argmax(-1))


def test_the_planner_counts_a_familys_own_tensors(toy):
    one = planner.tensor_bytes(toy, width=4)
    assert one == 4 * 2 * P * P * 4  # two tables, each with its gradient and two Adam moments, fp32
    engine = TorchBackend()
    d, pairs = int(0.5 * P * P), P * P
    budget = planner.population_bytes(toy, 4, d, pairs, 10, engine, device="cuda")
    assert planner.models_that_fit(toy, 4, d, pairs, torch.device("cuda"), budget, engine) == 10


def test_ipr_pruning_and_resume_work_for_any_family(tmp_path, toy, ctrl_c_at_step):
    out = tmp_path / "run"
    grid = Grid.of(xi=[0.0, 0.3], width=4)
    restore = ctrl_c_at_step(25)  # Ctrl-C at the 25th step
    with pytest.raises(Interrupted):
        train(grid, toy, out, device="cpu")
    restore()
    assert resume(out, device="cpu").status == "complete"
    train(grid, toy, tmp_path / "straight", device="cpu")
    assert (out / "models.csv").read_text() == (tmp_path / "straight" / "models.csv").read_text()
    summary = analysis.ipr(out)
    assert sum(s["models"] for s in summary.values()) == 2
    assert set(pq.read_table(out / "ipr.parquet").column_names) >= {"ipr_a", "ipr_b", "ipr", "dead"}
    curves = analysis.prune(out, every=P)
    for curve in curves.values():  # all P output units pruned: every logit 0, the accuracy of a constant guess
        assert curve["pruned"].tolist() == [0, P] and curve["test_acc"][-1] <= 1 / P + 0.1
        assert math.isfinite(curve["test_loss"][-1])


def test_a_family_without_kernels_refuses_them_and_auto_takes_torch(toy):
    with pytest.raises(ConfigError, match="has no triton backend"):
        make_backend("triton", torch.device("cpu"), settings=toy)
    assert make_backend("auto", torch.device("cpu"), settings=toy).name == "torch"
    with pytest.raises(ConfigError, match="unknown model"):
        Settings(model="transformer-xl").check()
