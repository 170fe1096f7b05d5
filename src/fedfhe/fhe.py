"""Convert a trained model to Concrete ML, compile it without training data, evaluate and export it."""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import importlib
import importlib.metadata
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe.artifacts import Artifacts, NBits, check_n_bits, read_artifacts
from fedfhe.data import check_features
from fedfhe.decision import POINT_MEMBER, decide, point_of
from fedfhe.decision import predict as predict_float  # the float model, at its operating point if it has one
from fedfhe.errors import FedfheError
from fedfhe.kinds import Kind
from fedfhe.label import Plan, compile_label
from fedfhe.model import LinearModel
from fedfhe.native import native_quiet
from fedfhe.problem import observed_record
from fedfhe.rundir import CLIENT_SPEC, COMPILE_INPUTS, FHE_INFO, SPEC_OBSERVED, SPEC_SCHEMA, RunDir


def bound_inputs(model: LinearModel) -> np.ndarray:
    """The (scaled) inputs in the declared box that reach each output's maximum and minimum.

    A linear output w.x + b is largest where x_i = high for w_i > 0 and low elsewhere, and
    smallest at the opposite corner. Concrete sizes every integer from what the compile set
    shows it, so with these corners (and the all-low and all-high inputs) every input in the box
    stays inside the compiled bounds: the circuit cannot silently overflow on real data.
    """
    rows = [np.zeros(model.n_features), np.ones(model.n_features)]
    for w in model.coef:
        rows += [(w > 0).astype(np.float64), (w <= 0).astype(np.float64)]
    return np.unique(np.array(rows), axis=0)


def concrete_class(kind: Kind) -> Any:
    """Concrete ML's estimator for a model kind (same name as scikit-learn's)."""
    return getattr(concrete("concrete.ml.sklearn"), kind.class_name)


def fit_concrete(kind: Kind, params: dict[str, Any], X: np.ndarray, y: np.ndarray) -> Any:
    """Concrete ML's own estimator of this kind, fitted (and quantized) on the given rows."""
    with quiet():
        return concrete_class(kind)(**params).fit(X, y)


OUTPUTS = ("scores", "label")  # what a client decrypts: the model's scores, or only the class


@dataclass
class CompiledModel:
    """A compiled Concrete ML model with the facts needed to trust and reproduce it."""

    concrete: Any
    source: LinearModel
    n_bits: NBits
    compile_inputs: np.ndarray
    calibration: str
    compile_seconds: float
    used: np.ndarray  # the features the circuit takes (see LinearModel.used_features), in the model's order
    label: Any = None  # outputs "label": the concrete-python circuit that returns the class index
    rule: Plan | None = None  # ... and the integer rule it computes

    @property
    def outputs(self) -> str:
        """What the circuit returns to a client: "scores" or "label"."""
        return "scores" if self.label is None else "label"

    @property
    def circuit(self) -> Any:
        """The FHE circuit a server runs."""
        return self.concrete.fhe_circuit if self.label is None else self.label

    def inputs(self, X: np.ndarray) -> np.ndarray:
        """Raw rows as this circuit takes them: scaled, only the features it was compiled on."""
        return self.source.scale(X)[:, self.used]

    def predict(self, X: np.ndarray, fhe: str) -> np.ndarray:
        """Classes or values for raw features, in the clear ("disable") or simulated FHE ("simulate")."""
        if self.source.is_regression:
            return np.ravel(self.concrete.predict(self.inputs(X), fhe=fhe))
        return self.classify(X, fhe)[0]

    def classify(self, X: np.ndarray, fhe: str) -> tuple[np.ndarray, np.ndarray | None]:
        """A classifier's classes (at its operating point) and class probabilities from one pass of the circuit.

        Label outputs give no probabilities: simulated, the label circuit itself answers.
        """
        classes = np.asarray(self.concrete.classes_)
        if self.label is not None and fhe == "simulate":
            q = self.concrete.quantize_input(self.inputs(X))
            picked = [int(np.ravel(self.label.simulate(row[None, :]))[0]) for row in q]
            return classes[np.array(picked, dtype=np.int64)], None
        scores = np.asarray(self.concrete.decision_function(self.inputs(X), fhe=fhe))
        proba = np.asarray(self.concrete.post_processing(scores)).reshape(len(X), -1)
        return classes[decide(proba, point_of(self.source))], None if self.label is not None else proba

    @property
    def bootstraps(self) -> int:
        """Programmable bootstraps a row costs the server (0 for scores outputs of a linear model)."""
        return int(self.circuit.programmable_bootstrap_count)

    @property
    def max_bit_width(self) -> int:
        """Widest integer in the FHE circuit."""
        return int(self.circuit.graph.maximum_integer_bit_width())

    def info(self) -> dict[str, Any]:
        """What fhe.json records about this compilation."""
        return {
            "model_sha256": self.source.sha256,
            "kind": self.source.kind.name,
            "n_bits": self.n_bits,
            "outputs": self.outputs,
            **({"label_rounding_lsbs": [self.rule.first, self.rule.second]} if self.rule is not None else {}),
            **({"operating_point": self.source.metadata["operating_point"]} if point_of(self.source) else {}),
            "bootstraps": self.bootstraps,
            "calibration": self.calibration,
            "max_bit_width": self.max_bit_width,
            "compile_seconds": self.compile_seconds,
            "n_features": self.source.n_features,
            "inputs_used": self.used.tolist(),  # the features encrypted, in the model's order
            "classes": [int(c) for c in self.source.classes],
            "input_low": self.source.input_range[0].tolist(),
            "input_high": self.source.input_range[1].tolist(),
            "inputs": "each feature scaled to [0, 1] by input_low/input_high before encryption",
        }


def check_outputs(outputs: str, regression: bool) -> None:
    """--outputs must name a mode, and label outputs need a classifier."""
    if outputs not in OUTPUTS:
        raise FedfheError(f"--outputs must be one of: {', '.join(OUTPUTS)} (got {outputs!r})")
    if outputs == "label" and regression:
        raise FedfheError("--outputs label applies to classifiers; a regressor's output is its value")


def compile_model(
    model: LinearModel, n_bits: NBits = 8, calibration: np.ndarray | None = None, outputs: str = "scores"
) -> CompiledModel:
    """Quantize and compile; without calibration data the bounds come from the input range alone.

    outputs "label": the circuit returns the class index only (see fedfhe.label), never the scores.
    """
    check_n_bits(n_bits)
    check_outputs(outputs, model.is_regression)
    if calibration is None:
        return _compile(model, n_bits, bound_inputs(model), "input-range bounds", outputs)
    inputs = check_features(calibration, model.n_features, model.input_range, "calibration data")
    return _compile(model, n_bits, model.scale(inputs), f"calibration sample ({len(inputs)} rows)", outputs)


def _compile(
    model: LinearModel,
    n_bits: NBits,
    scaled_inputs: np.ndarray,
    calibration: str,
    outputs: str,
    used: np.ndarray | None = None,
) -> CompiledModel:
    """Convert the model (on scaled features, `used` ones: by default those it weighs) and compile its circuit."""
    converter = concrete_class(model.kind)  # imported before the clock starts: compile time is compile time
    used = model.used_features if used is None else used
    X = scaled_inputs[:, used]
    start = time.perf_counter()
    with quiet():
        concrete = converter.from_sklearn_model(model.to_scaled_sklearn(used), X=X, n_bits=n_bits)
        if outputs == "scores":
            concrete.compile(X)
            circuit, rule = None, None
        else:  # the quantizers are Concrete ML's; the circuit is the label rule on them
            circuit, rule = compile_label(concrete, point_of(model))
    seconds = time.perf_counter() - start
    return CompiledModel(concrete, model, n_bits, scaled_inputs, calibration, seconds, used, circuit, rule)


def _deployable(compiled: CompiledModel) -> Any:
    """What Concrete ML's deployment saves: the model itself, or a copy whose circuit is the label one."""
    if compiled.label is None:
        return compiled.concrete
    deployed = copy.copy(compiled.concrete)  # same quantizers, so FHEModelClient encrypts for the label circuit
    deployed.fhe_circuit_, deployed._is_compiled = compiled.label, True
    return deployed


def export(compiled: CompiledModel, run_dir: str | os.PathLike[str]) -> Path:
    """Write client.zip, server.zip, the compile inputs and fhe.json into run_dir/fhe (replaced whole)."""
    target = RunDir(run_dir).fhe
    staging = Path(tempfile.mkdtemp(prefix=".fhe-", dir=run_dir))
    try:
        with quiet():
            concrete("concrete.ml.deployment").FHEModelDev(str(staging), _deployable(compiled)).save()
        point = point_of(compiled.source)
        with zipfile.ZipFile(staging / CLIENT_SPEC, "a") as spec:  # pinned with the spec, as the client reads them
            if "schema" in compiled.source.metadata:  # how a client encodes raw rows
                spec.writestr(SPEC_SCHEMA, json.dumps(compiled.source.metadata["schema"]))
            if point is not None:  # the threshold a client applies to its decrypted scores
                spec.writestr(POINT_MEMBER, json.dumps(dataclasses.asdict(point)))
            if (observed := compiled.source.observed_range) is not None:  # beyond it a client extrapolates
                spec.writestr(SPEC_OBSERVED, json.dumps(observed_record(observed)))
        np.save(staging / COMPILE_INPUTS, compiled.compile_inputs)
        (staging / FHE_INFO).write_text(json.dumps(compiled.info(), indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_compiled(run_dir: str | os.PathLike[str], model: LinearModel) -> CompiledModel:
    """Recompile exactly as `export` recorded, after checking the artifacts belong to this model."""
    return compile_as(model, read_artifacts(RunDir(run_dir), model))


def compile_as(model: LinearModel, artifacts: Artifacts) -> CompiledModel:
    """Compile `model` as recorded artifacts were: their n_bits, compile inputs, features and outputs."""
    return _compile(
        model,
        artifacts.n_bits,
        artifacts.compile_inputs,
        artifacts.calibration,
        artifacts.outputs,
        artifacts.inputs_used,
    )


FHE_SAMPLES = 100  # rows run with real encryption unless told otherwise (fewer when the test set is smaller)


def fhe_samples_for(fhe_samples: int | None, n_test: int) -> int:
    """--fhe-samples as given, which must fit in the test set; by default 100 or every row of a smaller one."""
    if fhe_samples is None:
        return min(FHE_SAMPLES, n_test)
    if not 0 <= fhe_samples <= n_test:
        raise FedfheError(f"--fhe-samples must be between 0 and the {n_test} test samples (got {fhe_samples})")
    return fhe_samples


def evaluate(
    compiled: CompiledModel,
    X: np.ndarray,
    y: np.ndarray,
    fhe_samples: int,
    artifacts: str | os.PathLike[str],
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score float, quantized-clear and simulated FHE on all rows, real FHE on the first fhe_samples.

    Classifiers are scored by accuracy, regressors by R2 and MSE; agreement is the share of rows
    whose FHE result equals the clear quantized one (values equal to 1e-9 relative for regressors).
    """
    model = compiled.source
    X = check_features(X, model.n_features, model.input_range, "test data")
    fhe_samples = fhe_samples_for(fhe_samples, len(X))
    sklearn_pred = predict_float(model, X)
    clear_pred = compiled.predict(X, fhe="disable")
    start = time.perf_counter()
    if model.is_regression:
        simulate_pred, proba = compiled.predict(X, fhe="simulate"), None
    else:
        simulate_pred, proba = compiled.classify(X, fhe="simulate")
    simulate_seconds = time.perf_counter() - start
    execute_pred, timings = execute(artifacts, compiled, X[:fhe_samples], on_sample)
    pairs = {
        "sklearn": (sklearn_pred, y),
        "fhe_clear": (clear_pred, y),
        "fhe_simulate": (simulate_pred, y),
        "fhe_execute": (execute_pred, y[:fhe_samples]),
        "fhe_clear_on_execute_rows": (clear_pred[:fhe_samples], y[:fhe_samples]),  # beside fhe_execute's figure
    }
    scores = _scores(model.is_regression, pairs)
    return {
        **scores,
        "agreement": {
            "execute_vs_simulate": _agree(execute_pred, simulate_pred[:fhe_samples]),
            "fhe_vs_clear": _agree(simulate_pred, clear_pred),
            "execute_vs_clear": _agree(execute_pred, clear_pred[:fhe_samples]),
            "fhe_vs_sklearn": _agree(simulate_pred, sklearn_pred) if not model.is_regression else None,
        },
        "timing_s": {"simulate_per_sample": simulate_seconds / max(len(X), 1), **timings},
        "predictions": {
            "y_true": y.tolist(),
            "fhe_simulate": simulate_pred.tolist(),
            "fhe_execute": execute_pred.tolist(),
            **({"fhe_simulate_proba": proba.tolist()} if proba is not None else {}),
        },
    }


def _scores(regression: bool, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Accuracy of each (predictions, truth) pair, or R2 and MSE; None where nothing was measured."""
    from sklearn.metrics import mean_squared_error, r2_score

    if not regression:
        return {"accuracy": {k: _mean(p == t) for k, (p, t) in pairs.items()}}
    return {
        "r2": {k: float(r2_score(t, p)) if len(p) > 1 else None for k, (p, t) in pairs.items()},
        "mse": {k: float(mean_squared_error(t, p)) if len(p) else None for k, (p, t) in pairs.items()},
    }


def _agree(a: np.ndarray, b: np.ndarray) -> float | None:
    """Share of equal results: same class, or the same value up to float rounding."""
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return _mean(np.isclose(a, b, rtol=1e-9, atol=1e-9))
    return _mean(a == b)


class CircuitServer:
    """A server.zip loaded with concrete-python alone: Concrete ML's FHEModelServer does the same after
    importing all of Concrete ML (5.3 s a process here, against 2.2 s for concrete.fhe).
    """

    def __init__(self, artifacts: str | os.PathLike[str]) -> None:
        self.fhe = concrete("concrete.fhe")
        path = Path(artifacts) / "server.zip"
        with zipfile.ZipFile(path) as archive:
            built = json.loads(archive.read("versions.json")).get("concrete-python")
        here = importlib.metadata.version("concrete-python")
        if built != here:
            raise FedfheError(f"{path}: compiled with concrete-python {built}, this is {here}; compile again")
        self.server = self.fhe.Server.load(path)

    def run(self, ciphertext: bytes, keys: Any) -> bytes:
        """One serialized ciphertext through the circuit under deserialized evaluation keys; serialized result."""
        result = self.server.run(self.fhe.Value.deserialize(ciphertext), evaluation_keys=keys)
        return result.serialize()  # type: ignore[no-any-return]


def execute(
    artifacts: str | os.PathLike[str],
    compiled: CompiledModel,
    X: np.ndarray,
    on_sample: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Real FHE through the exported client.zip/server.zip of `compiled`: keygen, scale + encrypt, run, decrypt."""
    deployment = concrete("concrete.ml.deployment")
    model, outputs, point = compiled.source, compiled.outputs, point_of(compiled.source)
    if len(X) == 0:
        return np.array([], dtype=np.float64 if model.is_regression else np.int64), {}
    with tempfile.TemporaryDirectory(prefix="fedfhe-keys-") as key_dir, quiet():
        client = deployment.FHEModelClient(str(artifacts), key_dir=key_dir)
        start = time.perf_counter()
        with native_quiet():
            client.generate_private_and_evaluation_keys()
        keys = client.get_serialized_evaluation_keys()
        keygen = time.perf_counter() - start
        server = CircuitServer(artifacts)
        # deserialized once, as the service's workers do: label outputs' keys are tens of MB
        held = concrete("concrete.fhe").EvaluationKeys.deserialize(keys)
        predictions, encrypt, run, decrypt, sizes = [], [], [], [], []
        for i, row in enumerate(compiled.inputs(X)):
            t0 = time.perf_counter()
            ciphertext = client.quantize_encrypt_serialize(row[None, :])
            t1 = time.perf_counter()
            result = server.run(ciphertext, held)
            t2 = time.perf_counter()
            if outputs == "label":  # the decrypted value is the class index
                predictions.append(model.classes[int(np.ravel(client.deserialize_decrypt(result))[0])])
            else:
                output = np.asarray(client.deserialize_decrypt_dequantize(result)).reshape(1, -1)
                predictions.append(output[0, 0] if model.is_regression else model.classes[decide(output, point)[0]])
            t3 = time.perf_counter()
            encrypt.append(t1 - t0)
            run.append(t2 - t1)
            decrypt.append(t3 - t2)
            sizes.append((len(ciphertext), len(result)))
            if on_sample is not None:
                on_sample(i + 1)
    totals = [a + b + c for a, b, c in zip(encrypt, run, decrypt)]
    return np.array(predictions), {
        "keygen": keygen,
        "fhe_execute_per_sample": statistics.median(totals),
        "encrypt_per_sample": statistics.median(encrypt),
        "server_run_per_sample": statistics.median(run),
        "server_run_fastest": min(run),  # the circuit's cost with the least noise: what tune ranks points by
        "decrypt_per_sample": statistics.median(decrypt),
        "evaluation_key_bytes": len(keys),
        "input_ciphertext_bytes": sizes[0][0],
        "output_ciphertext_bytes": sizes[0][1],
    }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation notices Concrete ML's dependencies print on import and use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


SCRATCH_PREFIX = "fedfhe-concrete-"


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Point this process's tempfile at a new folder of ours, removed after: Concrete's temporary folders go with it.

    concrete-python makes one for each circuit it compiles or loads and never removes it (its `Server.cleanup`
    does nothing): `compile` left 1 in /tmp, `evaluate` 4, a two-point `tune` 9.
    """
    folder = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
    saved, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(folder, ignore_errors=True)


def concrete(module: str) -> Any:
    """Import a Concrete module on first use (it costs seconds), without the notices its dependencies print.

    torch, under Concrete ML, prints "No CUDA runtime is found" to stderr on import wherever nvcc is
    installed without a GPU; a command's error must stay one line.
    """
    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        imported = importlib.import_module(module)
    keep_exit_status()
    return imported


def keep_exit_status() -> None:
    """Drop Concrete's exit hook, which ends the process with status 0 once a circuit has run.

    concrete.compiler registers `_terminate_df_parallelization` with atexit; after any FHE execution it
    turns `sys.exit(2)` (a refusal, a failed test run) into exit status 0. fedfhe never starts the
    dataflow runtime that hook stops, so the hook goes.
    """
    compiler = sys.modules.get("concrete.compiler")
    if compiler is not None:
        atexit.unregister(compiler._terminate_df_parallelization)


def _mean(values: np.ndarray) -> float | None:
    """Fraction of True values; None when nothing was measured."""
    return float(np.mean(values)) if len(values) else None
