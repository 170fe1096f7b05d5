"""Many clients and DP worth its name: Poisson sampling, adaptive clipping, target epsilon, server optimizers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedfhe import TrainConfig, fhe, train
from fedfhe.errors import FedfheError
from fedfhe.federated.privacy import epsilon, noise_multiplier, privacy_spent
from fedfhe.model import LinearModel

PRIVATE = TrainConfig(clients=12, rounds=3, fraction=0.5, dp=True, target_epsilon=20.0, clipping_norm=0.01, seed=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"fraction": 0.0}, r"--fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"--fraction must be in \(0, 1\]"),
        ({"dp": True, "target_epsilon": 0.0}, "--target-epsilon must be > 0"),
        ({"dp": True, "target_epsilon": -3.0}, "--target-epsilon must be > 0"),
        ({"dp": True, "target_epsilon": 4.0, "noise_multiplier": 1.0}, "not both"),
        ({"target_epsilon": 4.0}, "--target-epsilon applies to DP training: add --dp"),
        ({"dp": True, "clip_quantile": 1.0}, "0 < --clip-quantile < 1"),
        ({"dp": True, "clipping": "hard"}, "unknown clipping 'hard'"),
        ({"dp": True, "secagg": True}, "--secagg --dp needs --clipping fixed"),
        ({"server_optimizer": "nesterov"}, "unknown server optimizer 'nesterov'"),
        ({"server_optimizer": "adam", "server_momentum": 0.9}, "--server-momentum applies to --server-optimizer sgd"),
        ({"server_momentum": 1.0}, r"--server-momentum must be in \[0, 1\)"),
        ({"server_lr": 0.0}, "--server-lr must be > 0"),
    ],
)
def test_bad_values_are_one_line_errors(settings, message):
    with pytest.raises(FedfheError, match=message) as refused:
        TrainConfig(clients=10, **settings)
    assert "\n" not in str(refused.value)


def test_target_epsilon_picks_the_smallest_noise_within_it_and_sampling_amplifies():
    config = TrainConfig(clients=1000, rounds=20, fraction=0.1, dp=True, target_epsilon=8.0)
    z = noise_multiplier(config)
    assert epsilon(config, z, 20) <= 8.0 < epsilon(config, z * 0.99, 20)
    assert 0.6 < z < 0.9  # Poisson sampling at q = 0.1 amplifies: without it, 20 rounds at eps 8 need z > 2
    everyone = TrainConfig(clients=1000, rounds=20, dp=True, target_epsilon=8.0)
    assert noise_multiplier(everyone) > 2 and epsilon(everyone, z, 20) > 5 * epsilon(config, z, 20)
    secagg = TrainConfig(clients=1000, rounds=20, fraction=0.1, dp=True, secagg=True, clipping="fixed")
    assert epsilon(secagg, z, 20) == epsilon(everyone, z, 20)  # fixed-size SecAgg+ rounds: no amplification claimed
    assert privacy_spent(secagg, z)["sampling"].startswith("fixed-size")
    with pytest.raises(FedfheError, match="--target-epsilon 0.001 is out of reach in 20 rounds"):
        noise_multiplier(TrainConfig(clients=10, rounds=20, dp=True, target_epsilon=0.001))


@pytest.fixture(scope="session")
def private_run(once, digits):
    """One DP federation: 12 clients each joining a round with probability 0.5, epsilon 20 over 3 rounds."""
    out = once("private-run", lambda folder: train(digits, PRIVATE, folder))
    return LinearModel.load(out / "model.npz"), json.loads((out / "metrics.json").read_text())


@pytest.mark.federation
def test_dp_rounds_sample_by_poisson_adapt_the_clipping_norm_and_report_epsilon(private_run):
    model, metrics = private_run
    rows = [row for row in metrics["rounds"] if row["round"] > 0]
    sampled = [row["sampled"] for row in rows]
    assert all(0 <= k <= PRIVATE.clients for k in sampled) and len(set(sampled)) > 1  # not a fixed 6 per round
    spent = [row["privacy"]["epsilon"] for row in rows]
    assert spent == sorted(spent) and 19 < spent[-1] <= 20.0 == PRIVATE.target_epsilon
    assert metrics["privacy"]["epsilon"] == spent[-1] and metrics["privacy"]["sampling"] == "poisson, q=0.5"
    norms = [row["privacy"]["clipping_norm"] for row in rows]
    assert norms[0] == PRIVATE.clipping_norm and norms[-1] > norms[0]  # every update clipped at 0.01: the norm grows
    assert 0 <= model.metadata["metrics"]["final"]["score"] <= 1  # 12 clients at epsilon 20: noisy (accuracy: bench)


@pytest.mark.federation
def test_the_dp_model_compiles_with_full_fhe_clear_agreement(private_run, digits):
    compiled = fhe.compile_model(private_run[0], n_bits=8)
    clear = compiled.predict(digits.X_test, fhe="disable")
    assert np.array_equal(compiled.predict(digits.X_test, fhe="simulate"), clear)


@pytest.mark.federation
@pytest.mark.parametrize("optimizer", ["adam", "yogi"])
def test_adaptive_server_optimizers_train(tmp_path, digits, federated_run, optimizer):
    fedavg = LinearModel.load(federated_run / "model.npz")  # the same clients and rounds, plain FedAvg (the default)
    config = TrainConfig(clients=3, rounds=2, local_iters=10, server_optimizer=optimizer, seed=0)
    model = train(digits, config, tmp_path)
    assert model.metadata["metrics"]["final"]["score"] > 0.6  # steps of about --server-lr (0.03) per weight and round
    assert not np.allclose(model.coef, fedavg.coef)
