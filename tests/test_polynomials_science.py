"""The sequel, "Grokking modular polynomials" (Doshi, He, Das, Gromov 2024), at CPU sizes: its analytic solutions
(S-term addition, eq. 2; multiplication through discrete logarithms, eq. 6) are exact once wide enough; networks
trained on multiplication and on 3-term addition generalise and learn periodic neurons close to those solutions
(the IPR in the discrete-log basis for multiplication, eq. 8); and of its Appendix C pairs, the polynomial of the
form h(g1(x) + g2(y)) generalises where its perturbed twin, at the same budget, only memorises."""

import pytest
import torch
from typer.testing import CliRunner

from fastgrok.analytic import analytic_weights, discrete_log, experts, primitive_root
from fastgrok.cli import app
from fastgrok.config import Grid, Settings
from fastgrok.data import task_table
from fastgrok.families.mlp import MLP, forward
from fastgrok.ipr import analytic_similarity, in_basis, neuron_ipr
from fastgrok.population import Population
from fastgrok.results import read_config, read_models, settings_of
from fastgrok.train import train
from fastgrok.errors import ConfigError
from fastgrok.polynomials import monomials, parse

runner = CliRunner()


def accuracy(op, p, terms, width, seed):
    x, z = task_table(op, p, terms)
    *inputs, W = analytic_weights(p, width, seed, terms, op)
    out = forward([u[None] for u in inputs], W[None], x[:, None], "quad" if terms == 2 else "pow")
    return (out.argmax(-1)[0] == z).float().mean().item()


@pytest.mark.parametrize("op, p, terms, wide, narrow", [
    ("add", 23, 2, 200, 20), ("add", 11, 3, 1000, 100), ("add", 7, 4, 10000, 300),
    ("mul", 11, 2, 100, 20), ("mul", 13, 2, 200, 20), ("mul", 23, 2, 100, 20), ("mul", 97, 2, 500, 50),
    ("mul", 11, 3, 1000, 100),
])
def test_the_analytic_solutions_are_exact_when_wide_and_not_when_narrow(op, p, terms, wide, narrow):
    assert all(accuracy(op, p, terms, wide, seed) == 1.0 for seed in range(3))
    assert max(accuracy(op, p, terms, narrow, seed) for seed in range(3)) < 0.95


def test_the_discrete_logarithm_turns_products_into_sums():
    for p in (7, 11, 23, 97):
        g, log = primitive_root(p), discrete_log(p)
        assert sorted(log[1:].tolist()) == list(range(p - 1)) and log[g] == 1
        x, y = torch.meshgrid(torch.arange(1, p), torch.arange(1, p), indexing="ij")
        assert torch.equal(log[x * y % p], (log[x] + log[y]) % (p - 1))


def test_the_log_basis_needs_a_prime():
    from fastgrok.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a prime p; 12 is not prime"):
        in_basis({}, "log", 12)


def mlp_parts(tensors, basis, p):
    parts = in_basis(MLP.ipr_parts(tensors), basis, p)
    return parts, [t for name, (t, _) in parts.items() if name != "w"], parts["w"][0]


def test_the_analytic_solutions_neurons_score_one_in_their_basis():
    """IPR 1 and similarity 1 for every neuron of the solutions (mul in the log basis; its zero neuron has no
    vector there and counts as dead); random weights score far lower."""
    for op, p, terms, width, basis in (("add", 11, 3, 300, "index"), ("mul", 23, 2, 100, "log")):
        *inputs, W = analytic_weights(p, width, 0, terms, op)
        names = ("U", "V") if terms == 2 else ("U1", "U2", "U3")
        parts, ins, out = mlp_parts({**dict(zip(names, (u[None] for u in inputs))), "W": W[None]}, basis, p)
        result = neuron_ipr(parts)
        assert result.model_mean().item() == pytest.approx(1.0) and int(result.dead.sum()) == (op == "mul")
        assert torch.nanmean(analytic_similarity(ins, out)).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(1, 23, 500, generator=g) for _ in range(2)]
    assert analytic_similarity(noise, torch.randn(1, 500, 23, generator=g)).mean().item() < 0.45


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Multiplication at p 23 and 3-term addition at p 11: width 256, half the data, AdamW lr 0.005, wd 5 (the
    sequel's Fig. 2-3 optimizer at a CPU size), 2,000 steps."""
    runs = {}
    for name, settings in (("mul", Settings(op="mul", p=23, steps=2000, log_every=500)),
                           ("add3", Settings(op="add", terms=3, act="pow", p=11, steps=2000, log_every=500))):
        grid = Grid.of(xi=0.0, alpha=0.5, width=256, wd=5.0, lr=0.005)
        runs[name] = train(grid, settings, tmp_path_factory.mktemp(name) / "run", device="cpu")
    return runs


def test_trained_networks_generalise_with_neurons_like_the_analytic_ones(trained):
    for name, run in trained.items():
        assert run.rows[0]["test_acc"] == 1.0, name
        assert runner.invoke(app, ["ipr", str(run.out), "--device", "cpu"]).exit_code == 0
        row = read_models(run.out)[0]
        # after training: periodic in the natural basis and close to the analytic neurons; at init (the same
        # model's weights before its first step) neither
        init = Population([row.hyper], settings_of(read_config(run.out)))
        basis = "log" if name == "mul" else "index"
        parts, ins, out = mlp_parts(init.tensors, basis, init.settings.p)
        start_ipr, start_sim = neuron_ipr(parts).model_mean().item(), torch.nanmean(analytic_similarity(ins, out)).item()
        # (a random vector's IPR is about 2 / (p/2): 0.3 at p 11)
        assert row["mean_ipr"] > max(0.6, start_ipr + 0.3), (name, row["mean_ipr"], start_ipr)
        assert row["analytic_similarity"] > max(0.65, start_sim + 0.2), (name, row["analytic_similarity"], start_sim)


def test_multiplications_neurons_are_periodic_in_the_log_basis_only(trained):
    out = trained["mul"].out
    assert runner.invoke(app, ["ipr", str(out), "--basis", "index", "--device", "cpu"]).exit_code == 0
    row = read_models(out)[0]
    assert row["mean_ipr"] < 0.3 and row["analytic_similarity"] < 0.5
    result = runner.invoke(app, ["ipr", str(out), "--basis", "cosine"])
    assert result.exit_code == 2 and "unknown --basis 'cosine'" in result.output


def test_a_polynomial_of_the_form_h_of_a_sum_generalises_and_its_twin_does_not(tmp_path):
    """The sequel's Appendix C pairs at p 23 (its table: 100% against 7.17% and 1.89% test accuracy, N 5000), as
    one run over the op axis: the same network, data fraction and steps generalise on h(g1(x) + g2(y)) and only
    memorise its twin, as `fastgrok learnability` tabulates beside the predicted class."""
    import csv

    ops = ["(2x+3y)^4", "(2x+3y)^4-x^2", "(4x+y^2)^3", "(4x+y^2)^3+xy"]
    run = train(Grid.of(op=ops, xi=0.0, alpha=0.5, width=512, wd=5.0, lr=0.005),
                Settings(p=23, steps=3000, log_every=1000), tmp_path / "run", device="cpu")
    test = {r["op"]: r["test_acc"] for r in run.rows}
    assert all(r["train_acc"] == 1.0 for r in run.rows)
    assert test[ops[0]] == test[ops[2]] == 1.0 and test[ops[1]] < 0.2 and test[ops[3]] < 0.2, test
    result = runner.invoke(app, ["learnability", str(run.out)])
    assert result.exit_code == 0 and "4 of 4 as predicted" in result.output, result.output
    table = {r["op"]: r for r in csv.DictReader(open(run.out / "learnability.csv"))}
    assert [table[op]["predicted"] for op in ops] == ["learnable", "not learnable"] * 2
    assert [table[op]["from_alpha"] for op in ops] == ["0.5", "", "0.5", ""]
    assert (run.out / "learnability.png").is_file()


@pytest.mark.parametrize("op, terms", [
    ("(x+y)^2", {(0, 2): 1, (1, 1): 2, (2, 0): 1}),
    ("3x-(y+1)^2", {(0, 0): 10, (0, 1): 9, (0, 2): 10, (1, 0): 3}),  # mod 11: -1 = 10, -2 = 9
    ("xy-yx+12", {(0, 0): 1}),
])
def test_a_polynomial_expands_into_its_monomials_mod_p(op, terms):
    assert monomials(parse(op), 11) == terms


@pytest.mark.parametrize("op", ["x/y", "x1+x2+x3"])
def test_the_experts_take_a_polynomial_in_x_and_y_without_division(op):
    with pytest.raises(ConfigError, match="experts' construction"):
        monomials(parse(op, terms=3 if "x3" in op else 2), 11)


def test_the_experts_construction_is_exact_on_a_polynomial_no_network_learns():
    """App. B's first polynomial at p 11: three multiplication experts, a softmax, a 3-term addition expert. Too
    narrow an addition expert is not exact; nor is a softmax too warm to pick one residue, whose near-uniform
    outputs leave the addition expert's output near 0 (MSE near 1/p)."""
    op = "2x^4y+x^2y^2+3xy^3"
    built = experts(op, 11, (100, 1000))
    assert built["acc"] == 1.0 and built["mse"] < 0.05 and len(built["monomials"]) == 3
    assert experts(op, 11, (100, 20))["acc"] < 0.9
    warm = experts(op, 11, (100, 1000), beta=0.1)
    assert warm["acc"] < 1.0 and warm["mse"] > 0.9 / 11


def test_the_experts_command_prints_the_table_and_refuses_bad_input():
    result = runner.invoke(app, ["experts", "--op", "x^2y+xy^2", "--p", "7", "--width", "50", "--add-width", "200"],
                           terminal_width=200)
    assert result.exit_code == 0 and "x^2y+xy^2" in result.output, result.output
    for args, message in ((["--op", "x/y"], "without division"), (["--op", "xy", "--p", "12"], "not"),
                          (["--op", "xy", "--p", "seven"], "prime moduli")):
        bad = runner.invoke(app, ["experts", *args])
        assert bad.exit_code == 2 and message in bad.output.strip().splitlines()[-1], bad.output
