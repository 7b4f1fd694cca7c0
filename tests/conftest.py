import os

import pytest
import torch

# Without a GPU, Triton kernels run in its CPU interpreter. Set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def ctrl_c_at_step(monkeypatch):
    """arm(n): Ctrl-C (KeyboardInterrupt) at the torch backend's n-th training step, counted from arming; arm
    returns a call that undoes it (resume then trains with the real step)."""
    from fastgrok.backends import TorchBackend

    real = TorchBackend.step

    def arm(n: int):
        calls = {"n": 0}

        def step(self, pop):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(self, pop)

        monkeypatch.setattr(TorchBackend, "step", step)
        return lambda: monkeypatch.setattr(TorchBackend, "step", real)

    return arm
