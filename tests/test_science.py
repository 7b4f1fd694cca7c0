"""The paper's phenomena on a CPU, at small size (p 47, N 64 and 128, 1000 steps: a few seconds)."""

import pytest

from fastgrok.backends import TorchBackend
from fastgrok.config import Hyper, Settings
from fastgrok.families.mlp import MLP
from fastgrok.ipr import model_ipr
from fastgrok.phases import phase
from fastgrok.population import Population

P, XI = 47, 0.35


@pytest.fixture(scope="module")
def trained():
    populations = [
        [
            Hyper(xi=0.0, alpha=0.7, width=64, wd=5.0, seed=0),  # clean data: generalises
            Hyper(xi=XI, alpha=0.7, width=64, wd=5.0, seed=0),  # corrupted + weight decay: full inversion
        ],
        [
            Hyper(xi=XI, alpha=0.5, width=128, wd=0.0, seed=0),  # corrupted, no regularisation, wider: memorisation
            Hyper(xi=XI, alpha=0.7, width=128, wd=0.0, seed=0),  # more data: memorises half the corrupted labels
            Hyper(xi=XI, alpha=0.7, width=128, dropout=0.3, seed=0),  # the same with dropout: inverts more of them
            Hyper(xi=XI, alpha=0.7, width=128, wd=15.0, seed=0),  # too much weight decay: forgets
        ],
    ]
    out = []
    for hypers in populations:
        pop = Population(hypers, Settings(p=P, steps=1000))
        engine = TorchBackend()
        for _ in range(1000):
            engine.step(pop)
        metrics = pop.evaluate()
        ipr = model_ipr(MLP, pop.tensors)
        out += [{k: v[b].item() for k, v in metrics.items()}
                | {"phase": phase(metrics["train_acc"][b].item(), metrics["test_acc"][b].item(), h.xi),
                   "ipr": ipr[b].item()}
                for b, h in enumerate(hypers)]
    return out


def test_clean_model_generalises(trained):
    m = trained[0]
    assert m["test_acc"] >= 0.99 and m["train_acc"] >= 0.99
    assert m["phase"] == "coexistence"


def test_weight_decay_inverts_the_corrupted_labels(trained):
    m = trained[1]
    # train accuracy settles at 1 - xi (plus the ~xi/p redrawn labels that happen to be right)
    assert m["train_acc"] == pytest.approx(1 - XI + XI / P, abs=0.02)
    assert m["inverted_acc"] >= 0.95 and m["corrupted_acc"] <= 0.05
    assert m["clean_acc"] >= 0.99 and m["test_acc"] >= 0.95
    assert m["phase"] == "full_inversion"


def test_without_regularisation_the_network_memorises(trained):
    m = trained[2]
    assert m["corrupted_acc"] >= 0.95 and m["train_acc"] >= 0.95
    assert m["test_acc"] < 0.5
    assert m["phase"] == "memorization"


def test_dropout_acts_like_weight_decay_and_inverts_what_it_would_memorise(trained):
    """The paper: dropout on the pre-activation, like weight decay, turns memorised corrupted labels into inverted
    ones (their true values), without costing the clean ones."""
    plain, dropout = trained[3], trained[4]
    assert plain["phase"] == dropout["phase"] == "partial_inversion"
    assert dropout["corrupted_acc"] <= plain["corrupted_acc"] - 0.1
    assert dropout["inverted_acc"] >= plain["inverted_acc"] + 0.1
    assert dropout["clean_acc"] >= 0.99 and dropout["test_acc"] >= plain["test_acc"] - 0.01


def test_too_much_weight_decay_forgets(trained):
    """The paper's forgetting phase: weight decay strong enough to keep the network from fitting what it saw,
    so neither train nor test accuracy reaches 90% (here the corrupted labels are neither memorised nor all
    inverted, and test accuracy falls well short)."""
    m = trained[5]
    assert m["phase"] == "forgetting"
    assert m["test_acc"] < 0.8 and m["train_acc"] < 0.8


def test_memorising_networks_have_aperiodic_neurons_and_inverting_ones_periodic(trained):
    """The paper's neuron-level picture: generalisation lives in near-single-frequency (high-IPR) neurons,
    memorisation in aperiodic (low-IPR) ones."""
    memorising, inverting = trained[2], [trained[1], trained[3], trained[4]]
    assert memorising["phase"] == "memorization" and all("inversion" in m["phase"] for m in inverting)
    assert memorising["ipr"] < 0.25
    assert all(m["ipr"] > 2 * memorising["ipr"] for m in inverting)


def test_batchnorm_on_minibatches_generalises_through_periodic_neurons():
    """BatchNorm after the activation, minibatches of 128 (the paper's BatchNorm setting, shrunk): clean data
    is learnt and generalises, and the neurons become near-single-frequency as without BatchNorm."""
    pop = Population([Hyper(xi=0.0, alpha=0.5, width=64, seed=0)], Settings(p=P, batch_size=128, batchnorm=True))
    at_init = model_ipr(MLP, pop.tensors).item()
    engine = TorchBackend()
    for _ in range(1000):
        engine.step(pop)
    metrics = pop.evaluate()  # with BatchNorm's running statistics
    assert metrics["train_acc"][0] >= 0.99 and metrics["test_acc"][0] >= 0.99
    assert at_init < 0.15 and model_ipr(MLP, pop.tensors).item() > 0.8
