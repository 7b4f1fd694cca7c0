"""Inverse participation ratio of the weights' Fourier spectra: how periodic each neuron is.

For a weight vector x over the p residues (for the MLP: a row of U or V over inputs, a column of W over outputs):

    x~  = |rfft(x)|              the paper's convention: keeps the DC bin; --fft full uses |fft(x)|
    IPR = sum_k x~_k^4 / (sum_k x~_k^2)^2

A single cosine scores 1 under rfft (0.5 under the full transform, whose spectrum has two equal peaks); a
Gaussian random vector about 2 / (p/2). A unit's IPR is the mean over its weight vectors, which its family names
(Family.ipr_parts: the MLP's neuron k of model b has U[b, :, k], V[b, :, k] and W[b, k, :]); a vector of zeros has
no IPR, and a unit whose vectors are all zero is dead (reported as such, never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FFTS = ("rfft", "full")
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


def model_ipr(family, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) each model's mean unit IPR (the history's `ipr` column)."""
    return neuron_ipr(family.ipr_parts(tensors)).model_mean()
