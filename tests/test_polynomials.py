"""Polynomials as tasks (--op "x^2+y^2"): the parser's precedence, powers, signs and juxtaposition, evaluation
mod p against plain integer arithmetic, the named ops as polynomials, and one-line errors for bad input."""

import re

import pytest
import torch
from typer.testing import CliRunner

from fastgrok.cli import app
from fastgrok.data import OPS, POLYNOMIALS, task_table
from fastgrok.errors import ConfigError

runner = CliRunner()
P = 11


def labels(op: str, p: int = P) -> list[int]:
    return task_table(op, p)[1].tolist()


def expected(f, p: int = P) -> list[int]:
    """f(x, y) in Python's integers, reduced mod p, over the pairs in canonical order (x major)."""
    return [f(x, y) % p for x in range(p) for y in range(p)]


@pytest.mark.parametrize("op, f", [
    ("x+y*2", lambda x, y: x + 2 * y),  # * before +
    ("x-y-1", lambda x, y: (x - y) - 1),  # left to right
    ("-x^2", lambda x, y: -(x**2)),  # ^ before unary minus
    ("(-x)^2", lambda x, y: x**2),
    ("x^3+y^0", lambda x, y: x**3 + 1),
    ("-3x+y", lambda x, y: -3 * x + y),  # negative coefficients, juxtaposition
    ("xy+x", lambda x, y: x * y + x),
    ("3(x+y)^2", lambda x, y: 3 * (x + y) ** 2),
    ("2x^2y", lambda x, y: 2 * x**2 * y),
    ("x1*x2 + x2**2", lambda x, y: x * y + y**2),  # x1, x2 and ** spelled the other way
    ("x^13 - x", lambda x, y: x**13 - x),  # powers past p, reduced as they go
    ("123456789*x", lambda x, y: 123456789 * x),
])
def test_a_polynomial_is_read_with_the_usual_precedence_and_evaluated_mod_p(op, f):
    assert labels(op) == expected(f)


def test_division_multiplies_by_the_inverse_where_the_divisor_is_never_zero():
    # y^2 + 1 has no root mod 11 (-1 is not a square mod a prime 3 mod 4)
    inverse = {k: pow(k, P - 2, P) for k in range(1, P)}
    assert labels("x/(y^2+1)") == expected(lambda x, y: x * inverse[(y * y + 1) % P])


@pytest.mark.parametrize("name", sorted(POLYNOMIALS))
def test_the_named_ops_are_their_polynomials(name):
    assert labels(name) == labels(POLYNOMIALS[name]) and name in OPS


@pytest.mark.parametrize("op, p, message", [
    ("x+", P, "cannot read --op 'x+': expected a number, a variable or '(' at 'the end'"),
    ("x^^2", P, "a power takes a non-negative integer exponent"),
    ("x+y)", P, "expected an operator at ')'"),
    ("x+z", P, "cannot read --op 'x+z' at 'z'"),
    ("x^100", P, "powers above 64 are not taken"),
    ("", P, "unknown op ''"),
    ("2^3^2", P, "expected an operator at '^ 2'"),  # a tower of powers is written with parentheses
    ("foo", P, "unknown op 'foo'"),
    ("x/y", P, "divides by a residue that is 0 for some inputs mod 11"),
    ("x/(y+1)", 9, "divides, which needs a prime p"),
])
def test_bad_polynomials_are_refused(op, p, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        task_table(op, p)


def test_a_bad_polynomial_is_one_line_from_the_command_line(tmp_path):
    result = runner.invoke(app, ["train", "--op", "x/y", "--p", "7", "--xi", "0", "--out", tmp_path / "run"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "not defined on every input" in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_a_polynomial_trains_as_its_named_op(tmp_path):
    """--op "x^2+y^2" is x2y2: the same labels, so the same run."""
    args = ["train", "--p", "7", "--width", "8", "--xi", "0,0.2", "--steps", "20", "--log-every", "10"]
    for op, out in (("x2y2", "named"), ("x^2 + y^2", "polynomial")):
        assert runner.invoke(app, [*args, "--op", op, "--out", tmp_path / out]).exit_code == 0
    assert (tmp_path / "named" / "models.csv").read_text() == (tmp_path / "polynomial" / "models.csv").read_text()
    assert torch.equal(task_table("x^2 + y^2", 7)[1], task_table("x2y2", 7)[1])


@pytest.mark.parametrize("args, message", [
    (["--terms", "6", "--p", "97"], "(p 97, 6 operands: 832,972,004,929 inputs) needs about"),
    (["--terms", "3", "--op", "sub"], "--op sub takes 2 operands"),
    (["--terms", "3", "--model", "transformer"], "the transformer model takes 2 operands"),
])
def test_bad_many_operand_tasks_are_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["train", "--xi", "0", "--steps", "5", *args, "--out", tmp_path / "run"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_a_list_of_tasks_is_a_grid_axis_tasks_of_a_kind_share_a_population(tmp_path):
    """--op with a comma list trains every task in one run: tasks with the same inputs and IPR basis in one
    population (each model with its own labels), div and mul apart; models.csv's op column, `phase --x op`; the
    tasks train as they do alone."""
    import csv

    from fastgrok import planner
    from fastgrok.backends import TorchBackend
    from fastgrok.config import Grid, Hyper, Settings
    from fastgrok.population import Population

    grid = Grid.of(op=["x+y", "div", "x*y", "mul", "x^2+y^2"], xi=[0.0, 0.2], width=[8, 12])
    populations = planner.plan(grid, Settings(p=7), torch.device("cpu"), TorchBackend())
    assert sorted(i for p in populations for i in p.ids()) == list(range(len(grid)))
    assert [(p.width, p.ops) for p in populations] == [(8, ("x+y", "x*y", "x^2+y^2")), (12, ("x+y", "x*y", "x^2+y^2")),
                                                       (8, ("div",)), (12, ("div",)), (8, ("mul",)), (12, ("mul",))]
    for p in populations:
        assert {grid.model(i).op for i in p.ids()} == set(p.ops) and {grid.model(i).width for i in p.ids()} == {p.width}
    with pytest.raises(ValueError, match="one kind"):
        Population([Hyper(width=8, op="x+y"), Hyper(width=8, op="div")], Settings(p=7))
    args = ["train", "--p", "7", "--width", "8", "--xi", "0,0.2", "--steps", "20", "--log-every", "10"]
    assert runner.invoke(app, [*args, "--op", "x+y, x*y ,x^2+y^2", "--out", tmp_path / "all"]).exit_code == 0
    rows = list(csv.DictReader(open(tmp_path / "all" / "models.csv")))
    assert [r["op"] for r in rows] == ["x+y", "x*y", "x^2+y^2"] * 2  # the op axis last: the innermost
    for op in ("x*y", "x^2+y^2"):  # each task's models as a run of that task alone trains them
        assert runner.invoke(app, [*args, "--op", op, "--out", tmp_path / op]).exit_code == 0
        alone = list(csv.DictReader(open(tmp_path / op / "models.csv")))
        mine = [r for r in rows if r["op"] == op]
        metrics = ("train_acc", "test_acc", "clean_acc", "corrupted_acc", "inverted_acc", "train_loss", "test_loss")
        assert [[r[k] for k in metrics] for r in mine] == [[r[k] for k in metrics] for r in alone]
        assert alone[0]["op"] == "" and len({r["test_acc"] for r in rows}) > 2  # the tasks' models differ
    result = runner.invoke(app, ["phase", str(tmp_path / "all"), "--x", "op", "--y", "xi"])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(open(tmp_path / "all" / "phase-xi-vs-op.csv")))
    assert sorted({r["op"] for r in table}) == ["x*y", "x+y", "x^2+y^2"]


def test_a_run_from_before_the_op_axis_still_reads(tmp_path):
    """config.json without an op axis and models.csv without an op column (runs of earlier versions)."""
    import json

    from fastgrok.results import inspect_run, read_models

    args = ["train", "--p", "7", "--width", "8", "--xi", "0,0.2", "--steps", "10", "--out", tmp_path / "run"]
    assert runner.invoke(app, args).exit_code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    del config["grid"]["op"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    lines = (tmp_path / "run" / "models.csv").read_text().splitlines()
    at = lines[0].split(",").index("op")
    (tmp_path / "run" / "models.csv").write_text("\n".join(",".join(c for k, c in enumerate(line.split(",")) if k != at)
                                                           for line in lines) + "\n")
    assert not inspect_run(tmp_path / "run").problems and len(read_models(tmp_path / "run")) == 2
    assert runner.invoke(app, ["phase", str(tmp_path / "run")]).exit_code == 0


def test_one_task_is_not_an_axis():
    from fastgrok.config import Grid

    with pytest.raises(ConfigError, match="give the op axis two tasks or more"):
        Grid.of(op="x*y")
