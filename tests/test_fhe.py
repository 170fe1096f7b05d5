"""Concrete ML conversion, data-free compilation, real FHE execution of a few samples."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, copy_of

from fedfhe import fhe
from fedfhe.artifacts import read_artifacts
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel
from fedfhe.rundir import CLIENT_SPEC, COMPILE_INPUTS, FHE_DIR, FHE_INFO, RunDir
from fedfhe.service.server import Limits, load_model_info

pytestmark = [pytest.mark.xdist_group("fhe")]  # one compiled circuit, built once


@pytest.fixture(scope="module")
def compiled_run(federated_run, tmp_path_factory) -> Path:
    """A folder with the federated run's model (the shared run itself stays as it is), `compiled` exports there."""
    out = tmp_path_factory.mktemp("compiled")
    shutil.copy(federated_run / "model.npz", out / "model.npz")
    return out


@pytest.fixture(scope="module")
def compiled(compiled_run):
    model = LinearModel.load(compiled_run / "model.npz")
    compiled = fhe.compile_model(model, n_bits=6)
    fhe.export(compiled, compiled_run)
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


@pytest.mark.federation
@pytest.mark.fhe
def test_fhe_agrees_with_the_clear_quantized_model(compiled, compiled_run, digits):
    result = fhe.evaluate(compiled, digits.X_test, digits.y_test, 3, compiled_run / FHE_DIR)
    agreement = result["agreement"]
    assert agreement["execute_vs_simulate"] == 1.0 and agreement["fhe_vs_clear"] == 1.0
    assert agreement["fhe_vs_sklearn"] > 0.95
    assert result["accuracy"]["fhe_simulate"] > 0.85
    assert len(result["predictions"]["fhe_execute"]) == 3
    assert result["timing_s"]["server_run_per_sample"] > 0
    assert result["timing_s"]["input_ciphertext_bytes"] > 1000


@pytest.mark.federation
def test_export_writes_deployment_artifacts_tied_to_the_model(compiled, compiled_run):
    info = json.loads((compiled_run / "fhe" / "fhe.json").read_text())
    assert info["model_sha256"] == compiled.source.sha256 and info["n_bits"] == 6
    assert {"client.zip", "server.zip"} <= {p.name for p in (compiled_run / "fhe").iterdir()}
    again = fhe.load_compiled(compiled_run, compiled.source)
    assert again.max_bit_width == compiled.max_bit_width
    other = LinearModel(compiled.source.coef * 2, compiled.source.intercept, compiled.source.classes, (0.0, 16.0))
    with pytest.raises(FedfheError, match="compiled for another model"):
        fhe.load_compiled(compiled_run, other)


@pytest.mark.federation
@pytest.mark.fhe
def test_input_and_weight_widths_apart_reach_the_circuit_its_files_and_the_service(
    compiled, compiled_run, digits, tmp_path
):
    run_copy = copy_of(compiled_run, tmp_path)
    narrow = fhe.compile_model(compiled.source, {"op_inputs": 6, "op_weights": 4})
    assert narrow.max_bit_width < compiled.max_bit_width  # 4-bit weights: narrower sums than 6 bits
    result = fhe.evaluate(narrow, digits.X_test, digits.y_test, 2, fhe.export(narrow, run_copy))
    assert result["agreement"]["fhe_vs_clear"] == 1.0 and result["accuracy"]["fhe_simulate"] > 0.85
    info, _ = load_model_info(RunDir(run_copy), Limits())
    assert info.n_bits == {"op_inputs": 6, "op_weights": 4} and info.max_bit_width == narrow.max_bit_width


@pytest.mark.federation
def test_calibration_sample_is_validated(compiled):
    with pytest.raises(FedfheError, match="calibration data has shape"):
        fhe.compile_model(compiled.source, 8, np.zeros((5, 3)))
    with pytest.raises(FedfheError, match="--n-bits must be between 2 and 12"):
        fhe.compile_model(compiled.source, 40)


@pytest.mark.federation
def test_evaluate_rejects_bad_requests(compiled, compiled_run, digits):
    with pytest.raises(FedfheError, match="--fhe-samples must be between 0 and the 360"):
        fhe.evaluate(compiled, digits.X_test, digits.y_test, 361, compiled_run / "fhe")
    X = digits.X_test.copy()
    X[0, 0] = np.nan
    with pytest.raises(FedfheError, match="NaN"):
        fhe.evaluate(compiled, X, digits.y_test, 1, compiled_run / "fhe")


def edit_info(**changes: object) -> Callable[[Path], None]:
    """A damage: rewrite fhe.json with some fields changed."""
    return lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def huge_shape(path: Path) -> None:
    """A damage: an .npy header declaring 10^12 rows of 64 features, with no data behind it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (10**12, 64)})
    path.write_bytes(buffer.getvalue())


def zip_of_zeros(path: Path) -> None:
    """A damage: a 32 KB zip that unpacks to 32 MiB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("client.specs.json", bytes(32 << 20))


NOT_N_BITS = r"n_bits must be an integer or \{op_inputs, op_weights\} integers"
BROKEN_ARTIFACTS: dict[str, tuple[str, Callable[[Path], object], str]] = {
    "fhe.json not JSON": (FHE_INFO, lambda p: p.write_text("{not json"), "Expecting property name"),
    "fhe.json nested deep": (FHE_INFO, lambda p: p.write_text("[" * 30_000 + "]" * 30_000), "maximum recursion"),
    "fhe.json a list": (FHE_INFO, lambda p: p.write_text("[8]"), "a JSON list, not an object"),
    "fhe.json n_bits a string": (FHE_INFO, edit_info(n_bits="8"), rf"{NOT_N_BITS} \(got '8'\)"),
    "fhe.json n_bits true": (FHE_INFO, edit_info(n_bits=True), rf"{NOT_N_BITS} \(got True\)"),
    "fhe.json n_bits 40": (FHE_INFO, edit_info(n_bits=40), "--n-bits must be between 2 and 12"),
    "fhe.json n_bits of unknown widths": (FHE_INFO, edit_info(n_bits={"op_inputs": 6, "bits": 4}), NOT_N_BITS),
    "fhe.json of 3 GiB": (FHE_INFO, lambda p: os.truncate(p, 3 << 30), r"3221225472 bytes, more than the \d+ it"),
    "compile inputs garbage": (COMPILE_INPUTS, lambda p: p.write_bytes(b"garbage" * 9), "magic string is not correct"),
    "compile inputs of 10^12 rows": (COMPILE_INPUTS, huge_shape, "0 bytes of data where its header declares 5120"),
    "compile inputs of another width": (
        COMPILE_INPUTS,
        lambda p: np.save(p, np.zeros((3, 5))),
        r"float64 of shape \(3, 5\), expected 2-D float64, 64 columns",
    ),
    "compile inputs with NaN": (COMPILE_INPUTS, lambda p: np.save(p, np.full((3, 64), np.nan)), "inf or NaN"),
    "compile inputs pickled": (
        COMPILE_INPUTS,
        lambda p: np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True),
        r"object of shape \(1,\)",
    ),
    "client.zip garbage": (CLIENT_SPEC, lambda p: p.write_bytes(b"garbage"), "File is not a zip file"),
    "client.zip bomb": (CLIENT_SPEC, zip_of_zeros, "unpacks to 33554432 bytes, more than 16777216"),
}


@pytest.fixture
def run_copy(served_run, tmp_path) -> Path:
    """A compiled run's model and FHE artifacts (digits, 6 bits), copied for a test to damage."""
    shutil.copy(served_run / "model.npz", tmp_path / "model.npz")
    shutil.copytree(served_run / FHE_DIR, tmp_path / FHE_DIR)
    return tmp_path


@pytest.mark.parametrize("case", BROKEN_ARTIFACTS)
def test_broken_artifacts_are_refused_in_one_line_naming_the_file(run_copy, case):
    name, damage, message = BROKEN_ARTIFACTS[case]
    model = LinearModel.load(run_copy / "model.npz")
    assert read_artifacts(RunDir(run_copy), model).n_bits == 6
    damage(run_copy / FHE_DIR / name)
    with pytest.raises(FedfheError, match=message) as refused:
        read_artifacts(RunDir(run_copy), model)
    assert str(refused.value).startswith(f"{run_copy / FHE_DIR / name}: unreadable FHE artifact (")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("case", BROKEN_ARTIFACTS)
def test_cli_refuses_broken_artifacts_in_one_line(run_copy, case):
    name, damage, message = BROKEN_ARTIFACTS[case]
    damage(run_copy / FHE_DIR / name)
    done = cli("evaluate", "--run", str(run_copy), "--fhe-samples", "1")
    lines = [line for line in done.stderr.splitlines() if not line.startswith("compiling the FHE circuit")]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr  # after the bar
    assert f"{name}: unreadable FHE artifact" in done.stderr and re.search(message, done.stderr)
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr


@pytest.mark.fhe
def test_a_failure_after_fhe_execution_keeps_its_exit_status(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from fedfhe.fhe import concrete; concrete('concrete.ml.deployment'); import concrete.fhe as fhe\n"
        "c = fhe.compiler({'x': 'encrypted'})(lambda x: x + 1).compile(range(8)); c.keygen(); c.encrypt_run_decrypt(3)\n"
        "sys.exit(3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, check=False)
    assert done.returncode == 3, done.stderr[-500:]  # Concrete's exit hook would make it 0
