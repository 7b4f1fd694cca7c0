"""Modular polynomials as tasks: `--op "x^2+y^2"`, `--op "xy+x"`, `--op "3x-(y+1)^2"`.

An expression in the variables x, y (or x1..xS, on S operands: --terms S) with integer constants, +, -, *, / (by a residue that is never 0),
^ (or **) to a non-negative integer power, unary minus and parentheses, a product also written by juxtaposition
(2x, xy, 3(x+y)); read by a small recursive-descent parser (never eval), and evaluated on every pair of residues
mod p at once, each operation reduced mod p:

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary | power)*
    unary  := "-" unary | power
    power  := atom (("^" | "**") integer)?
    atom   := integer | variable | "(" expr ")"

The label of the pair (x, y) is the expression's value mod p.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fastgrok.errors import ConfigError

_TOKEN = re.compile(r"\s*(?:(\d+)|(x\d+|[xy])|(\*\*|[-+*/^()]))")
MAX_POWER = 64  # far above any degree a network is asked to learn; bounds the work of evaluating x^k


@dataclass(frozen=True)
class Node:
    """An expression tree: kind is "num" (value), "var" (value: the operand's index), "neg", "pow" (value: the
    exponent) or one of + - * / with children `args`."""

    kind: str
    value: int = 0
    args: tuple[Node, ...] = ()


def _tokens(text: str) -> list[str]:
    out, k = [], 0
    text = text.rstrip()
    while k < len(text):
        match = _TOKEN.match(text, k)
        if match is None:
            raise ConfigError(f"cannot read --op {text!r} at {text[k:].strip()!r}: a polynomial takes x, y (or x1, "
                              "x2, ...), integers, + - * / ^ and parentheses")
        out.append(next(g for g in match.groups() if g is not None))
        k = match.end()
    return out


class _Parser:
    def __init__(self, text: str, terms: int):
        self.text, self.tokens, self.k, self.terms = text, _tokens(text), 0, terms

    def fail(self, what: str) -> ConfigError:
        at = " ".join(self.tokens[self.k :]) or "the end"
        return ConfigError(f"cannot read --op {self.text!r}: {what} at {at!r}")

    def peek(self) -> str | None:
        return self.tokens[self.k] if self.k < len(self.tokens) else None

    def take(self) -> str:
        self.k += 1
        return self.tokens[self.k - 1]

    def parse(self) -> Node:
        if not self.tokens:
            raise ConfigError("--op is empty: give a polynomial such as x^2+y^2, or a named op")
        node = self.expr()
        if self.peek() is not None:
            raise self.fail("expected an operator")
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = Node(self.take(), args=(node, self.term()))
        return node

    def term(self) -> Node:
        node = self.unary()
        while True:
            if self.peek() in ("*", "/"):
                node = Node(self.take(), args=(node, self.unary()))
            elif self.peek() is not None and self.peek() not in ("+", "-", ")", "^", "**"):
                node = Node("*", args=(node, self.power()))  # juxtaposition: 2x, xy, 3(x+y)
            else:
                return node

    def unary(self) -> Node:
        if self.peek() == "-":
            self.take()
            return Node("neg", args=(self.unary(),))
        return self.power()

    def power(self) -> Node:
        node = self.atom()
        if self.peek() in ("^", "**"):
            self.take()
            exponent = self.peek()
            if exponent is None or not exponent.isdigit():
                raise self.fail("a power takes a non-negative integer exponent")
            self.take()
            if int(exponent) > MAX_POWER:
                raise ConfigError(f"--op {self.text!r}: powers above {MAX_POWER} are not taken, got {exponent}")
            node = Node("pow", int(exponent), (node,))
        return node

    def atom(self) -> Node:
        token = self.peek()
        if token is None:
            raise self.fail("expected a number, a variable or '('")
        self.take()
        if token.isdigit():
            return Node("num", int(token))
        if token in ("x", "y"):
            if self.terms != 2:
                raise ConfigError(f"--op {self.text!r}: x and y name the operands of a 2-term task; with --terms "
                                  f"{self.terms} they are x1..x{self.terms}")
            return Node("var", 0 if token == "x" else 1)
        if token.startswith("x"):
            if not 1 <= int(token[1:]) <= self.terms:
                raise ConfigError(f"--op {self.text!r}: {token} is not an operand of a {self.terms}-term task "
                                  f"(x1..x{self.terms}; --terms sets how many)")
            return Node("var", int(token[1:]) - 1)
        if token == "(":
            node = self.expr()
            if self.peek() != ")":
                raise self.fail("expected ')'")
            self.take()
            return node
        self.k -= 1
        raise self.fail("expected a number, a variable or '('")


def parse(text: str, terms: int = 2) -> Node:
    """The expression tree of a polynomial in `terms` operands (ConfigError, naming where, if it cannot be
    read)."""
    return _Parser(text, terms).parse()


def has_division(node: Node) -> bool:
    return node.kind == "/" or any(has_division(a) for a in node.args)


def evaluate(node: Node, operands, p: int) -> torch.Tensor:
    """The expression's value mod p (int64, an operand's shape) at the residues `operands` (x, y, or x1..xS).
    Division multiplies by the inverse (p prime); a divisor that is 0 somewhere is a ConfigError."""
    shape = operands[0].shape
    if node.kind == "num":
        return torch.full(shape, node.value % p, dtype=torch.long)
    if node.kind == "var":
        return operands[node.value] % p
    values = [evaluate(a, operands, p) for a in node.args]
    if node.kind == "neg":
        return (-values[0]) % p
    if node.kind == "pow":
        out, base, e = torch.ones(shape, dtype=torch.long), values[0], node.value
        while e:  # square and multiply, reduced mod p at each product
            if e & 1:
                out = out * base % p
            base, e = base * base % p, e >> 1
        return out % p
    a, b = values
    if node.kind == "+":
        return (a + b) % p
    if node.kind == "-":
        return (a - b) % p
    if node.kind == "*":
        return a * b % p
    if bool((b == 0).any()):
        at = ", ".join(str(int(x[b == 0][0])) for x in operands)
        raise ConfigError(f"the polynomial divides by a residue that is 0 for some inputs mod {p} (at ({at})): it is "
                          "not defined on every input; --op div leaves out the pairs with y = 0")
    return a * inverses(p)[b] % p


def monomials(node: Node, p: int) -> dict[tuple[int, int], int]:
    """A polynomial in x, y expanded: {(a, b): c} for its terms c x^a y^b, c a non-zero residue mod p."""
    def times(f, g):
        out: dict[tuple[int, int], int] = {}
        for (a, b), c in f.items():
            for (a2, b2), c2 in g.items():
                out[a + a2, b + b2] = (out.get((a + a2, b + b2), 0) + c * c2) % p
        return out

    def walk(n: Node) -> dict[tuple[int, int], int]:
        if n.kind == "num":
            return {(0, 0): n.value % p}
        if n.kind == "var":
            if n.value > 1:
                raise ConfigError("the experts' construction takes a polynomial in x and y")
            return {(1, 0) if n.value == 0 else (0, 1): 1}
        if n.kind == "neg":
            return {k: -c % p for k, c in walk(n.args[0]).items()}
        if n.kind == "pow":
            out, base = {(0, 0): 1}, walk(n.args[0])
            for _ in range(n.value):
                out = times(out, base)
            return out
        if n.kind in ("+", "-"):
            out, sign = dict(walk(n.args[0])), 1 if n.kind == "+" else -1
            for k, c in walk(n.args[1]).items():
                out[k] = (out.get(k, 0) + sign * c) % p
            return out
        if n.kind == "*":
            return times(walk(n.args[0]), walk(n.args[1]))
        raise ConfigError("the experts' construction takes a polynomial without division")

    return {k: c for k, c in sorted(walk(node).items()) if c}


def inverses(p: int) -> torch.Tensor:
    """(p,) the inverse of each residue mod the prime p (entry 0: 0, which has none)."""
    return torch.tensor([0] + [pow(k, p - 2, p) for k in range(1, p)])


# The polynomials of the `polynomials` presets, each with the class the sequel's Hypothesis 5.1 predicts: a network
# learns (generalises on) h(g1(x) + g2(y)) for functions g1, g2, h on GF(p), and nothing else; with why. For the
# others, a row that is constant (x = 0) beside a row that is a bijection of y (x = 1) rules the form out: a
# bijective row makes g2 one-to-one, so g1(0) + g2(y) takes every value and h would be constant everywhere.
SURVEY = {
    "x+y": ("learnable", "h, g1, g2 the identity"),
    "2x+3y": ("learnable", "g1 = 2x, g2 = 3y"),
    "x*y": ("learnable", "h = exp_g, g1 = g2 = log_g, zero apart (the sequel's eq. 6)"),
    "x^2*y": ("learnable", "x^a y^b = exp_g(a log_g x + b log_g y)"),
    "x^2+y^2": ("learnable", "g1 = x^2, g2 = y^2"),
    "x^3+2y": ("learnable", "g1 = x^3, g2 = 2y"),
    "(x+y)^3": ("learnable", "h = z^3"),
    "(2x+3y)^4": ("learnable", "h = z^4 (the sequel's Appendix C)"),
    "(4x+y^2)^3": ("learnable", "h = z^3, g1 = 4x, g2 = y^2 (Appendix C)"),
    "x^2+xy": ("not learnable", "row x = 0 constant, row x = 1 (y + 1) a bijection"),
    "x^3+xy": ("not learnable", "row x = 0 constant, row x = 1 (y + 1) a bijection"),
    "xy+y^2": ("not learnable", "column y = 0 constant, column y = 1 (x + 1) a bijection"),
    "(2x+3y)^4-x^2": ("not learnable", "Appendix C: 3.93% test at p 97, 7.17% at p 23"),
    "(4x+y^2)^3+xy": ("not learnable", "Appendix C: 2.27% at p 97, 1.89% at p 23"),
}
