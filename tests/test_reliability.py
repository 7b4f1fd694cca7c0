"""Partial and damaged runs, full disks, huge grids: each case is reproduced first (a killed run, a damaged file, a
writer that raises ENOSPC), then it must end in a one-line error (exit 2) or the right result, losing nothing that
was saved."""

import pytest
from typer.testing import CliRunner

from fastgrok.cli import app
from fastgrok.config import Grid, Hyper, Settings

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def one_line_error(result, *words):
    lines = result.output.rstrip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and all(w in lines[0] for w in words), result.output
    return lines[0]


def test_whole_numbers_of_a_grid_stay_exact(tmp_path):
    """Seeds beyond 2^53 are whole numbers, not floats rounded together; seeds past 2^63 (the random streams' key)
    are refused."""
    grid = Grid.parse({"seed": "9007199254740992,9007199254740993"})
    assert grid.axes["seed"] == [9007199254740992, 9007199254740993]
    from fastgrok.population import Population

    pop = Population(grid.models(), Settings(p=7), "cpu")
    assert not __import__("torch").equal(pop.U[0], pop.U[1])
    one_line_error(run("train", "--p", "7", "--seed", "0,18446744073709551616", "--out", tmp_path / "r"),
                   "--seed must be in [0, 2^63)")
    one_line_error(run("train", "--p", "7", "--width", "8.5", "--out", tmp_path / "r"), "--width takes whole numbers")
    assert not (tmp_path / "r").exists()


def test_a_hyper_is_read_from_the_grid_by_its_index():
    grid = Grid.parse({"xi": "0,0.1,0.2", "wd": "0,5", "seed": "0,1,2", "width": "8,16"})
    assert [grid.model(i) for i in range(len(grid))] == grid.models()
    assert grid.model(len(grid) - 1) == Hyper(xi=0.2, width=16, wd=5.0, seed=2)
