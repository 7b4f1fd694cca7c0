"""One helper for every tensor comparison: reports max/mean error and NaN mismatches."""

import torch


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN in {int(nan_a.sum())} places, expected {int(nan_e.sum())}"
    err = (actual - expected).abs()[~nan_e]
    bound = atol + rtol * expected.abs()[~nan_e]
    if err.numel() and not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        raise AssertionError(f"{name}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e}, "
                             f"{int((err > bound).sum())} of {err.numel()} outside atol {atol} rtol {rtol} "
                             f"(worst at flat index {worst})")
