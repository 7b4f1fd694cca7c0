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


def vector_ipr(x: torch.Tensor, dim: int = -1, fft: str = "rfft") -> torch.Tensor:
    """IPR along `dim`; NaN where the vector is all zero (callers turn that into 'missing')."""
    spectrum = (torch.fft.rfft if fft == "rfft" else torch.fft.fft)(x.double(), dim=dim).abs()
    power = spectrum.square()
    return power.square().sum(dim) / power.sum(dim).square()


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
