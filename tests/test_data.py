import re

import pytest
import torch

from fastgrok.data import OPS, check_task, make_split, pair_count, task_table
from fastgrok.errors import ConfigError


def brute(op, p):
    rows = []
    for m in range(p):
        for n in range(p):
            if op == "div":
                if n == 0:
                    continue
                z = next(z for z in range(p) if (z * n) % p == m)
            else:
                z = {"add": m + n, "sub": m - n, "mul": m * n, "x2y2": m * m + n * n, "x2xyy2": m * m + m * n + n * n}[op] % p
            rows.append((m, n, z))
    return rows


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("p", [2, 7, 13])
def test_every_op_matches_brute_force(op, p):
    (m, n), z = task_table(op, p)
    assert list(zip(m.tolist(), n.tolist(), z.tolist())) == brute(op, p)
    assert pair_count(op, p) == len(z)  # what the memory planner counts without building the table


def test_composite_p_refused_for_div_and_small_p_everywhere():
    with pytest.raises(ConfigError, match="prime"):
        check_task("div", 12)
    with pytest.raises(ConfigError, match="at least 2"):
        check_task("add", 1)
    with pytest.raises(ConfigError, match="unknown op"):
        check_task("pow", 7)
    check_task("mul", 12)  # composite p is fine for the other ops


@pytest.mark.parametrize("alpha, xi", [(0.5, 0.0), (0.5, 0.35), (0.3, 1.0), (0.77, 0.123)])
def test_corrupted_count_is_int_xi_d_and_test_labels_are_clean(alpha, xi):
    p = 97
    _, z = task_table("add", p)
    s = make_split(z, p, alpha, xi, split_seed=3, noise_seed=4)
    d = int(alpha * p * p)
    assert s.size == d and s.n_corrupt == int(xi * d)
    true = z[s.perm[:d]]
    # clean examples keep their true labels; test labels are never touched (they are z itself)
    assert torch.equal(s.labels[s.n_corrupt:], true[s.n_corrupt:])
    # uniform noise: about 1/p of redrawn labels equal the true one, the rest differ
    if s.n_corrupt > 500:
        same = (s.labels[: s.n_corrupt] == true[: s.n_corrupt]).float().mean().item()
        assert same < 0.05
    assert sorted(s.perm.tolist()) == list(range(p * p))


@pytest.mark.parametrize("op, terms, f", [
    ("add", 3, lambda x: x.sum(0)), ("mul", 3, lambda x: x.prod(0)), ("add", 4, lambda x: x.sum(0)),
    ("x1*x2+x3^2", 3, lambda x: x[0] * x[1] + x[2] ** 2),
])
def test_a_task_of_s_operands_is_every_tuple_first_operand_major(op, terms, f):
    p = 5
    x, z = task_table(op, p, terms)
    assert x.shape == (terms, p**terms) and pair_count(op, p, terms) == p**terms
    assert x[:, 1].tolist() == [0] * (terms - 1) + [1] and x[:, p].tolist() == [0] * (terms - 2) + [1, 0]
    assert len({tuple(c) for c in x.T.tolist()}) == p**terms  # each tuple once
    assert torch.equal(z, f(x) % p)


def test_the_count_of_many_operands_needs_no_table():
    assert pair_count("add", 97, 3) == 912_673 and pair_count("add", 97, 8) == 97**8  # the latter never built


@pytest.mark.parametrize("op, terms, message", [
    ("sub", 3, "--op sub takes 2 operands; with --terms 3 give add, mul or a polynomial in x1..x3"),
    ("div", 3, "--op div takes 2 operands"),
    ("x+y", 3, "x and y name the operands of a 2-term task"),
    ("x1+x4", 3, "x4 is not an operand of a 3-term task"),
    ("add", 1, "--terms must be between 2 and 8, got 1"),
])
def test_operands_and_the_task_must_agree(op, terms, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_task(op, 7, terms)


@pytest.mark.parametrize("terms", [2, 3])
def test_corruption_is_nested_across_xi(terms):
    p = 31 if terms == 2 else 11
    _, z = task_table("add", p, terms)
    splits = [make_split(z, p, 0.5, xi, split_seed=1, noise_seed=2) for xi in (0.1, 0.3, 0.6)]
    for small, big in zip(splits, splits[1:]):
        assert torch.equal(small.perm, big.perm)
        assert torch.equal(small.labels[: small.n_corrupt], big.labels[: small.n_corrupt])
        assert small.n_corrupt < big.n_corrupt


def test_determinism_and_seed_dependence():
    p = 23
    _, z = task_table("add", p)
    a = make_split(z, p, 0.5, 0.4, split_seed=5, noise_seed=6)
    b = make_split(z, p, 0.5, 0.4, split_seed=5, noise_seed=6)
    c = make_split(z, p, 0.5, 0.4, split_seed=7, noise_seed=6)
    d = make_split(z, p, 0.5, 0.4, split_seed=5, noise_seed=8)
    assert torch.equal(a.perm, b.perm) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.perm, c.perm)
    assert torch.equal(a.perm, d.perm) and not torch.equal(a.labels, d.labels)


def test_wrong_noise_is_always_wrong():
    p = 13
    _, z = task_table("add", p)
    s = make_split(z, p, 0.6, 1.0, split_seed=0, noise_seed=0, noise="wrong")
    assert s.n_corrupt == s.size
    assert bool((s.labels != z[s.perm[: s.size]]).all())


@pytest.mark.parametrize("alpha, xi", [(0.0, 0.1), (1.0, 0.1), (0.5, -0.1), (0.5, 1.5)])
def test_bad_fractions_refused(alpha, xi):
    _, z = task_table("add", 11)
    with pytest.raises(ConfigError):
        make_split(z, 11, alpha, xi, 0, 0)
