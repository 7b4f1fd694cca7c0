"""Inverse participation ratio of the weights' Fourier spectra: how periodic each neuron is.

For a weight vector x over the p residues (a row of U or V over inputs, a column of W over outputs):

    x~  = |rfft(x)|              the paper's convention: keeps the DC bin; --fft full uses |fft(x)|
    IPR = sum_k x~_k^4 / (sum_k x~_k^2)^2

A single cosine scores 1 under rfft (0.5 under the full transform, whose spectrum has two equal peaks); a
Gaussian random vector about 2 / (p/2). A neuron's IPR is the mean over its U row, V row and W column; a
vector of zeros has no IPR, and a neuron whose three vectors are all zero is dead (reported as such, never NaN).

Layout: U, V (B, p, N): neuron k of model b is U[b, :, k]; W (B, N, p): its output weights are W[b, k, :].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FFTS = ("rfft", "full")
HIGH_IPR = 0.5  # default threshold for "high-IPR" (periodic, generalising) neurons


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
    """Per-neuron IPR of a population, each (B, N). Missing values (zero vectors) are NaN in u, v, w;
    `mean` averages what exists and is NaN only for dead neurons, which `dead` flags."""

    u: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor
    mean: torch.Tensor
    dead: torch.Tensor

    def high_fraction(self, threshold: float = HIGH_IPR) -> torch.Tensor:
        """(B,) fraction of a model's live neurons whose IPR exceeds `threshold`."""
        live = (~self.dead).sum(1)
        return ((self.mean > threshold) & ~self.dead).sum(1) / live.clamp(min=1)

    def model_mean(self) -> torch.Tensor:
        """(B,) mean IPR over each model's live neurons."""
        return torch.nanmean(self.mean, dim=1)


@torch.no_grad()
def neuron_ipr(U: torch.Tensor, V: torch.Tensor, W: torch.Tensor, fft: str = "rfft", chunk: int = 256) -> NeuronIPR:
    """Batched over models (in chunks of `chunk`, bounding the fp64 spectra's memory) and neurons."""
    u, v, w = (torch.cat([vector_ipr(t[i : i + chunk], dim, fft) for i in range(0, t.shape[0], chunk)])
               for t, dim in ((U, 1), (V, 1), (W, 2)))
    parts = torch.stack([u, v, w])
    dead = parts.isnan().all(0)
    mean = torch.where(dead, torch.nan, torch.nanmean(parts, dim=0))
    return NeuronIPR(u, v, w, mean, dead)


@torch.no_grad()
def neuron_spectra(U: torch.Tensor, V: torch.Tensor, W: torch.Tensor, fft: str = "rfft") -> torch.Tensor:
    """(B, N, F) each neuron's power fractions over the F frequencies, averaged over those of its U row, V row
    and W column that are not zero, as its IPR is; NaN rows for dead neurons. A periodic neuron of frequency s
    has its power at bin min(s, p - s) under rfft."""
    parts = torch.stack([power_fraction(U, 1, fft).transpose(1, 2), power_fraction(V, 1, fft).transpose(1, 2),
                         power_fraction(W, 2, fft)])
    return torch.nanmean(parts, dim=0)
