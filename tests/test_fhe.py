"""Concrete ML conversion, data-free compilation, real FHE execution of a few samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedfhe import fhe
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel
from fedfhe.rundir import FHE_DIR


@pytest.fixture(scope="module")
def compiled(federated_run):
    model = LinearModel.load(federated_run / "model.npz")
    compiled = fhe.compile_model(model, n_bits=6)
    fhe.export(compiled, federated_run)
    return compiled


def test_bound_inputs_enclose_every_output_over_the_input_box():
    rng = np.random.default_rng(0)
    low, high = rng.uniform(-3, 0, size=12), rng.uniform(1, 500, size=12)
    model = LinearModel(rng.normal(size=(5, 12)), rng.normal(size=5), np.arange(5), (low, high))
    bounds = fhe.bound_inputs(model)  # in the circuit's input space: each feature scaled to [0, 1]
    weights = model.to_scaled_sklearn().coef_
    reach = bounds @ weights.T
    X = rng.uniform(low, high, size=(2000, 12))
    X[:100] = np.where(rng.random((100, 12)) < 0.5, low, high)  # box corners too
    outputs = model.scale(X) @ weights.T
    assert (outputs >= reach.min(axis=0) - 1e-9).all() and (outputs <= reach.max(axis=0) + 1e-9).all()
    assert bounds.min() == 0 and bounds.max() == 1


def test_fhe_agrees_with_the_clear_quantized_model(compiled, federated_run, digits):
    result = fhe.evaluate(compiled, digits.X_test, digits.y_test, 3, federated_run / FHE_DIR)
    agreement = result["agreement"]
    assert agreement["execute_vs_simulate"] == 1.0 and agreement["fhe_vs_clear"] == 1.0
    assert agreement["fhe_vs_sklearn"] > 0.95
    assert result["accuracy"]["fhe_simulate"] > 0.85
    assert len(result["predictions"]["fhe_execute"]) == 3
    assert result["timing_s"]["server_run_per_sample"] > 0
    assert result["timing_s"]["input_ciphertext_bytes"] > 1000


def test_export_writes_deployment_artifacts_tied_to_the_model(compiled, federated_run):
    info = json.loads((federated_run / "fhe" / "fhe.json").read_text())
    assert info["model_sha256"] == compiled.source.sha256 and info["n_bits"] == 6
    assert {"client.zip", "server.zip"} <= {p.name for p in (federated_run / "fhe").iterdir()}
    again = fhe.load_compiled(federated_run, compiled.source)
    assert again.max_bit_width == compiled.max_bit_width
    other = LinearModel(compiled.source.coef * 2, compiled.source.intercept, compiled.source.classes, (0.0, 16.0))
    with pytest.raises(FedfheError, match="compiled for another model"):
        fhe.load_compiled(federated_run, other)


def test_calibration_sample_is_validated(compiled):
    with pytest.raises(FedfheError, match="calibration data has shape"):
        fhe.compile_model(compiled.source, 8, np.zeros((5, 3)))
    with pytest.raises(FedfheError, match="--n-bits must be between 2 and 12"):
        fhe.compile_model(compiled.source, 40)


def test_evaluate_rejects_bad_requests(compiled, federated_run, digits):
    with pytest.raises(FedfheError, match="--fhe-samples must be between 0 and the 360"):
        fhe.evaluate(compiled, digits.X_test, digits.y_test, 361, federated_run / "fhe")
    X = digits.X_test.copy()
    X[0, 0] = np.nan
    with pytest.raises(FedfheError, match="NaN"):
        fhe.evaluate(compiled, X, digits.y_test, 1, federated_run / "fhe")
