"""Inverse participation ratio of the weights' Fourier spectra: how periodic each neuron is.

For a weight vector x over the p residues (for the MLP: a row of U or V over inputs, a column of W over outputs):

    x~  = |rfft(x)|              the paper's convention: keeps the DC bin; --fft full uses |fft(x)|
    IPR = sum_k x~_k^4 / (sum_k x~_k^2)^2

A single cosine scores 1 under rfft (0.5 under the full transform, whose spectrum has two equal peaks); a
Gaussian random vector about 2 / (p/2).

The residues are taken in their own order (basis "index"), or for multiplication in the order of their discrete
logarithm (basis "log": g^0, g^1, ..., g^(p-2) for a primitive root g, residue 0 left out), where a product is a
sum and the sequel's analytic solution is periodic (its eq. 7-8). A run's natural basis is log for --op mul.

analytic_similarity scores how close each neuron of the MLP is to a neuron of the analytic solution (cosines of one
frequency f in every input and output vector, the output's phase the sum of the inputs'): for the best f, the
mean over its vectors of the cosine similarity to that neuron's (input phases free, so each input vector's is the
share of its energy in frequency f, |C_f| sqrt(2 / (p sum x^2)); the output's also times |cos| of its phase
against the sum of the inputs'). 1 for the analytic solution's neurons; 0.37 for Gaussian random ones (p 23,
2 inputs: the best of 11 frequencies). A unit's IPR is the mean over its weight vectors, which its family names
(Family.ipr_parts: the MLP's neuron k of model b has U[b, :, k], V[b, :, k] and W[b, k, :]); a vector of zeros has
no IPR, and a unit whose vectors are all zero is dead (reported as such, never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrok.errors import ConfigError

FFTS = ("rfft", "full")
BASES = ("index", "log")
HIGH_IPR = 0.5  # default threshold for "high-IPR" (periodic, generalizing) neurons


def power_fraction(x: torch.Tensor, dim: int = -1, fft: str = "rfft") -> torch.Tensor:
    """Each frequency's share of the vector's power along `dim`, x~_k^2 / sum_k x~_k^2 (fp64); NaN where the
    vector is all zero."""
    power = (torch.fft.rfft if fft == "rfft" else torch.fft.fft)(x.double(), dim=dim).abs().square()
    return power / power.sum(dim, keepdim=True)


def vector_ipr(x: torch.Tensor, dim: int = -1, fft: str = "rfft") -> torch.Tensor:
    """IPR along `dim` (the sum of the squared power fractions); NaN where the vector is all zero (callers turn
    that into 'missing')."""
    return power_fraction(x, dim, fft).square().sum(dim)


@dataclass
class NeuronIPR:
    """Per-unit IPR of a population, each (B, units). `parts`: the IPR of each of a unit's weight vectors, by the
    family's names for them (the MLP's u, v, w), NaN for zero vectors; `mean` averages what exists and is NaN only
    for dead units, which `dead` flags."""

    parts: dict[str, torch.Tensor]
    mean: torch.Tensor
    dead: torch.Tensor

    def high_fraction(self, threshold: float = HIGH_IPR) -> torch.Tensor:
        """(B,) fraction of a model's live units whose IPR exceeds `threshold`."""
        live = (~self.dead).sum(1)
        return ((self.mean > threshold) & ~self.dead).sum(1) / live.clamp(min=1)

    def model_mean(self) -> torch.Tensor:
        """(B,) mean IPR over each model's live units."""
        return torch.nanmean(self.mean, dim=1)


@torch.no_grad()
def neuron_ipr(parts: dict[str, tuple[torch.Tensor, int]], fft: str = "rfft", chunk: int = 256) -> NeuronIPR:
    """IPR of every unit of a population, from Family.ipr_parts: name -> (tensor (B, a, b), its residue dim, 1
    or 2; the other dim indexes the units). Batched over models (in chunks of `chunk`, bounding the fp64
    spectra's memory) and units."""
    values = {name: torch.cat([vector_ipr(t[i : i + chunk], dim, fft) for i in range(0, t.shape[0], chunk)])
              for name, (t, dim) in parts.items()}
    stacked = torch.stack(list(values.values()))
    dead = stacked.isnan().all(0)
    mean = torch.where(dead, torch.nan, torch.nanmean(stacked, dim=0))
    return NeuronIPR(values, mean, dead)


@torch.no_grad()
def neuron_spectra(parts: dict[str, tuple[torch.Tensor, int]], fft: str = "rfft") -> torch.Tensor:
    """(B, units, F) each unit's power fractions over the F frequencies, averaged over those of its weight vectors
    (Family.ipr_parts) that are not zero, as its IPR is; NaN rows for dead units. A periodic neuron of
    frequency s has its power at bin min(s, p - s) under rfft."""
    spectra = [power_fraction(t, dim, fft).transpose(1, 2) if dim == 1 else power_fraction(t, dim, fft)
               for t, dim in parts.values()]
    return torch.nanmean(torch.stack(spectra), dim=0)


def natural_basis(settings) -> str:
    """The order of the residues in which a run's neurons are periodic: their discrete logarithm's for mul."""
    return "log" if settings.op == "mul" else "index"


def in_basis(parts: dict[str, tuple[torch.Tensor, int]], basis: str, p: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Family.ipr_parts with the residue dims in the order of `basis` (log: p - 1 entries, residue 0 left out)."""
    from fastgrok.analytic import discrete_log
    from fastgrok.data import is_prime

    if basis not in BASES:
        raise ConfigError(f"unknown --basis {basis!r}; choose one of {', '.join(BASES)}")
    if basis == "index":
        return parts
    if not is_prime(p):
        raise ConfigError(f"--basis log orders the residues by their discrete logarithm, which needs a prime p; "
                          f"{p} is not prime")
    order = torch.argsort(discrete_log(p))[1:]  # the residue whose log is 0, 1, ..., p - 2
    return {name: (t.index_select(dim, order.to(t.device)), dim) for name, (t, dim) in parts.items()}


def model_ipr(family, tensors: dict[str, torch.Tensor], settings=None) -> torch.Tensor:
    """(B,) each model's mean unit IPR (the history's `ipr` column), in the run's natural basis."""
    parts = family.ipr_parts(tensors)
    if settings is not None:
        parts = in_basis(parts, natural_basis(settings), settings.p)
    return neuron_ipr(parts).model_mean()


@torch.no_grad()
def analytic_similarity(inputs: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """(B, N) each MLP neuron's similarity to the closest neuron of the analytic solution (module docstring), from
    its input vectors inputs[s] (B, P, N) and output vectors (B, N, P) over the P residues of a basis; NaN for a
    neuron whose vectors are all zero."""
    spectra = [torch.fft.rfft(u.double(), dim=1).transpose(1, 2) for u in inputs]  # (B, N, F)
    spectra.append(torch.fft.rfft(output.double(), dim=2))
    P = output.shape[-1]
    energy = [torch.stack([u.double().square().sum(1) for u in inputs]), output.double().square().sum(2)[None]]
    energy = torch.cat(energy)[..., None]  # (S + 1, B, N, 1)
    c = torch.stack(spectra)[..., 1 : P // 2 + 1]  # frequencies 1..P/2: each a cosine with a free phase
    # a frequency f's cosines hold 2 |C_f|^2 / P of a vector's energy, P/2's (even P: one coefficient) |C_f|^2 / P
    weight = torch.full((c.shape[-1],), 2.0, dtype=torch.float64, device=c.device)
    if P % 2 == 0:
        weight[-1] = 1.0
    share = (c.abs() * (weight / (P * energy)).sqrt()).nan_to_num(0.0)  # cosine similarity to f's best cosine
    phase = torch.cos(c[-1].angle() - c[:-1].angle().sum(0)).abs()  # the output's phase against the inputs' sum
    score = torch.cat([share[:-1], (share[-1] * phase)[None]]).mean(0).amax(-1)
    return torch.where((energy == 0).all(0)[..., 0], torch.nan, score)
