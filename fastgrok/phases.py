"""The paper's phases (App. C), from a model's final accuracies and its corruption fraction xi.

    test >= 90%:  train >= 90%                    -> coexistence
                  100 (1.05 - xi)% <= train < 90% -> partial_inversion
                  otherwise                       -> full_inversion
    test <  90%:  train >= 90%                    -> memorization
                  otherwise                       -> forgetting
A model that diverged (non-finite loss) is `diverged`.
"""

from __future__ import annotations

import math

PHASES = ("coexistence", "partial_inversion", "full_inversion", "memorization", "forgetting")
THRESHOLD = 0.9
TOL = 1e-9  # accuracies are ratios of counts; 1.05 - 0.35 is 0.7000000000000001 in floating point


def phase(train_acc: float, test_acc: float, xi: float, diverged: bool = False) -> str:
    if diverged or not (math.isfinite(train_acc) and math.isfinite(test_acc)):
        return "diverged"
    if test_acc >= THRESHOLD - TOL:
        if train_acc >= THRESHOLD - TOL:
            return "coexistence"
        if train_acc >= 1.05 - xi - TOL:
            return "partial_inversion"
        return "full_inversion"
    return "memorization" if train_acc >= THRESHOLD - TOL else "forgetting"
