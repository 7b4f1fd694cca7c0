import pytest

from fastgrok.phases import phase


@pytest.mark.parametrize(
    "train, test, xi, expected",
    [
        (1.0, 1.0, 0.0, "coexistence"),
        (0.9, 0.9, 0.35, "coexistence"),  # both thresholds are inclusive
        (0.9 - 1e-6, 0.9, 0.35, "partial_inversion"),
        (0.70, 0.95, 0.35, "partial_inversion"),  # train = 1.05 - xi exactly (0.7000000000000001 in floats)
        (0.70 - 1e-6, 0.95, 0.35, "full_inversion"),
        (0.65, 1.0, 0.35, "full_inversion"),
        (0.85, 0.99, 0.2, "partial_inversion"),
        (0.8499, 0.99, 0.2, "full_inversion"),
        (0.89, 0.99, 0.1, "full_inversion"),  # 1.05 - xi > 0.9: no partial band for small xi
        (1.0, 0.9 - 1e-6, 0.35, "memorization"),
        (0.9, 0.2, 0.5, "memorization"),
        (0.9 - 1e-6, 0.2, 0.5, "forgetting"),
        (0.3, 0.0, 0.0, "forgetting"),
        (float("nan"), 0.5, 0.1, "diverged"),
    ],
)
def test_phase_boundaries(train, test, xi, expected):
    assert phase(train, test, xi) == expected


def test_diverged_flag_wins():
    assert phase(1.0, 1.0, 0.0, diverged=True) == "diverged"
