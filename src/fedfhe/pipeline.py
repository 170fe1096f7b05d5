"""The whole way from a data set to an encrypted-inference report, and the steps users repeat on a run.

`run` trains, compiles without data and evaluates in FHE; `evaluate_run` and `tune_run` work on a
run directory later. Long steps report through a `Progress`; the CLI only draws it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedfhe import card, decision, fhe, quality, report, result, table, training, tuning
from fedfhe.artifacts import NBits, bit_pair, check_n_bits, compiled_outputs, read_artifacts
from fedfhe.config import TrainConfig
from fedfhe.data import Dataset, MiB, check_features, load_dataset, read_table
from fedfhe.errors import FedfheError
from fedfhe.fhe import CompiledModel, fhe_samples_for
from fedfhe.model import LinearModel
from fedfhe.rundir import RunDir

PathLike = str | os.PathLike[str]


class Progress(Protocol):
    """Where long steps report. Steps: training, compiling, fhe, tuning."""

    def start(self, step: str, total: int | None = None) -> None:
        """A step begins; `total` units of it, when known."""

    def update(self, done: int, **figures: float) -> None:
        """`done` units of the current step are finished (with figures worth showing, e.g. a score)."""


class Silent:
    """A Progress that reports nothing."""

    def start(self, step: str, total: int | None = None) -> None:
        """Nothing to show."""

    def update(self, done: int, **figures: float) -> None:
        """Nothing to show."""


QUIET: Progress = Silent()


@dataclass(frozen=True)
class RunResult:
    """What `run` leaves besides the files: the model, its circuit and the report's summary."""

    model: LinearModel
    compiled: CompiledModel
    summary: dict[str, Any]


def dataset(
    name: str,
    seed: int = 0,
    data_dir: PathLike | None = None,
    data: PathLike | None = None,
    schema: PathLike | None = None,
    owners: PathLike | None = None,
    test: PathLike | None = None,
    max_input_mb: float | None = None,
    positive_class: str | None = None,
    allow_overlap: bool = False,
) -> Dataset:
    """A bundled data set by name, or the user's own table (`data`), or one file per owner with a test file.

    A user's file larger than `max_input_mb` MiB is refused before it is read. Of two classes in a
    user's table, one must be named positive, by the schema or `positive_class` (which overrides it):
    never the first or last by position. A bundled data set names its own (breast-cancer: malignant).
    A row of the test file in an owner's file is refused unless `allow_overlap`.
    """
    limit = _max_bytes(max_input_mb)
    if data is None and schema is None and owners is None and test is None:
        return load_dataset(name, data_dir=data_dir, seed=seed)
    if data is not None and owners is not None:
        raise FedfheError("--data or --owners, not both: one table to split, or one file per owner")
    if (owners is None) != (test is None):
        raise FedfheError("--owners and --test go together: the owners' files and the server's held-out test file")
    if schema is None or (data is None and owners is None):
        raise FedfheError(
            "--data (or --owners) and --schema go together: your table and the schema the parties agreed on"
        )
    agreed = table.Schema.load(schema).with_positive(positive_class)
    agreed.check_positive()
    if owners is not None and test is not None:
        return table.load_owners(owners, test, agreed, limit, allow_overlap)
    assert data is not None  # checked above
    return table.load(data, agreed, seed, max_bytes=limit)


def _split_of(
    target: RunDir,
    name: str,
    seed: int,
    data_dir: PathLike | None,
    test_only: bool = False,
    allow_overlap: bool = False,
) -> Dataset:
    """The run's data again: a bundled one by name, or the user's files with the schema the run kept.

    `test_only`: the test rows are all that is needed (the owners' files are not read again). `allow_overlap`:
    as the run was trained (test rows in an owner's file are refused otherwise).
    """
    if target.schema_file.exists():
        schema = table.Schema.load(target.schema_file)
        return table.reload(target.read_source(), schema, seed, test_only, allow_overlap)
    return load_dataset(name, data_dir=data_dir, seed=seed)


def run(
    dataset: Dataset,
    config: TrainConfig,
    out: PathLike,
    *,
    n_bits: NBits = 8,
    calibration: PathLike | None = None,
    fhe_samples: int | None = None,
    progress: Progress = QUIET,
    verbose: bool = False,
    force: bool = False,
    max_input_mb: float | None = None,
    positive_class: str | None = None,
    outputs: str = "scores",
    operating_point: decision.Rule | None = None,
) -> RunResult:
    """Train, compile from the input ranges (or a calibration file) and evaluate; everything lands in `out`.

    Every option is checked before anything is written; `force` as in `train`; `positive_class` as in
    `evaluate_run`; `outputs` as in `compile_run`. `operating_point`: the threshold of a two-class model,
    chosen on the run's held-out test rows (the coordinator's).
    """
    check_n_bits(n_bits)
    fhe.check_outputs(outputs, dataset.is_regression)
    config.problem(dataset)
    named = result.names(dataset)
    classes, names = [int(c) for c in dataset.classes], named["class_names"]
    _check_positive(positive_class, dataset.is_regression, classes, names, named.get("positive_class"))
    if operating_point is not None:
        _check_point(classes, names, positive_class, named.get("positive_class"))
    fhe_samples = fhe_samples_for(fhe_samples, len(dataset.y_test))
    limit = _max_bytes(max_input_mb)
    sample = None if calibration is None else read_table(calibration, max_bytes=limit)[0]
    model = train(dataset, config, out, progress, verbose, force=force)
    target = RunDir(out)
    if operating_point is not None:
        model = _at_point(target, model, operating_point, dataset.X_test, dataset.y_test, positive_class, None)
    compiled = compile_run(target, n_bits, sample, progress, model, outputs=outputs)
    summary = _evaluate(compiled, target, dataset.X_test, dataset.y_test, fhe_samples, progress, positive_class)
    return RunResult(model, compiled, summary)


def train(
    dataset: Dataset,
    config: TrainConfig,
    out: PathLike,
    progress: Progress = QUIET,
    verbose: bool = False,
    resume: bool = False,
    force: bool = False,
) -> LinearModel:
    """training.train, reporting rounds (and the test score after each) as the `training` step.

    A folder that already holds a run is refused unless `force` (start over: what that run wrote is
    removed first) or `resume`.
    """
    config.problem(dataset)  # before the run directory is touched
    progress.start("training", config.rounds if config.clients > 1 else None)
    score = config.kind.score_names[0]

    def on_round(r: int, metrics: dict[str, float]) -> None:
        if r > 0:
            progress.update(r, **{score: metrics["score"]})

    return training.train(dataset, config, out, on_round, verbose, resume, force)


def resume(run_dir: PathLike, data_dir: PathLike | None = None, progress: Progress = QUIET) -> LinearModel:
    """Continue an interrupted run from its last checkpoint, with the data set and config it started with."""
    target = RunDir(run_dir)
    name, config = target.read_config()
    split = _split_of(target, name, config.seed, data_dir, allow_overlap=config.allow_overlap)
    return train(split, config, target.path, progress, resume=True)


def compile_run(
    run_dir: PathLike,
    n_bits: NBits = 8,
    calibration: np.ndarray | PathLike | None = None,
    progress: Progress = QUIET,
    model: LinearModel | None = None,
    max_input_mb: float | None = None,
    outputs: str | None = None,
    operating_point: decision.Rule | None = None,
    positive_class: str | None = None,
    data_dir: PathLike | None = None,
) -> CompiledModel:
    """Compile the run's model (without data, unless a calibration sample is given) and export the artifacts.

    The run's report of the circuit replaced is removed and its card, if any, rewritten. A calibration
    file larger than `max_input_mb` MiB is refused before it is read. `outputs`: what a client decrypts,
    "scores" or "label" (the class only); by default what the run was compiled for. `operating_point`:
    chosen anew on the run's held-out test rows for `positive_class` (default the model's), without retraining.
    """
    check_n_bits(n_bits)
    limit = _max_bytes(max_input_mb)
    target = RunDir(run_dir)
    model = model or target.load_model()
    outputs = outputs or compiled_outputs(target, model)
    fhe.check_outputs(outputs, model.is_regression)
    if calibration is not None and not isinstance(calibration, np.ndarray):
        calibration = read_table(calibration, max_bytes=limit)[0]
    if operating_point is not None:
        _check_point(
            [int(c) for c in model.classes], model.class_names, positive_class, model.metadata.get("positive_class")
        )
        split = _split_of(target, model.metadata["dataset"], model.metadata["training"]["seed"], data_dir, True)
        model = _at_point(target, model, operating_point, split.X_test, split.y_test, positive_class, None)
    target.create()
    progress.start("compiling")
    compiled = fhe.compile_model(model, n_bits, calibration, outputs)
    _replace_circuit(target, compiled)
    return compiled


def _replace_circuit(target: RunDir, compiled: CompiledModel) -> None:
    """Export a new circuit: the report of the one replaced goes, the card is written again."""
    fhe.export(compiled, target.path)
    target.forget_evaluation()
    _rewrite_card(target)


def _rewrite_card(target: RunDir) -> None:
    """A card written earlier is written again from the run's records: it never names a replaced circuit."""
    if target.card_json.exists():
        card.write(target)


def evaluate_run(
    run_dir: PathLike,
    fhe_samples: int | None = None,
    data: PathLike | None = None,
    data_dir: PathLike | None = None,
    progress: Progress = QUIET,
    max_input_mb: float | None = None,
    positive_class: str | None = None,
    operating_point: decision.Rule | None = None,
) -> dict[str, Any]:
    """Evaluate the run's compiled model on its test split (its report and card rewritten), or on a labelled file.

    A file's report goes to RUN/evaluations/<file name>/ (see evaluation_dir), never over the run's. A data file larger than
    `max_input_mb` MiB is refused before it is read. For two classes, sensitivity, PPV, AUC and Brier
    are about `positive_class` (a class name or number; default the class the model names).
    `operating_point`: chosen anew on the rows evaluated, stored in the run's model and compiled as its
    circuit was (the run's report is removed, as by compile), then evaluated.
    """
    limit = _max_bytes(max_input_mb)
    target = RunDir(run_dir)
    model = target.load_model()
    classes, named = [int(c) for c in model.classes], model.metadata.get("positive_class")
    _check_positive(positive_class, model.is_regression, classes, model.class_names, named)
    if operating_point is not None:
        _check_point(classes, model.class_names, positive_class, named)
    if data is None:
        split = _split_of(target, model.metadata["dataset"], model.metadata["training"]["seed"], data_dir, True)
        X, y = split.X_test, split.y_test
    elif "schema" in model.metadata and Path(data).suffix.lower() != ".npz":  # a table: columns by name, text
        X, y = table.read_labelled(
            data, table.Schema.from_dict(model.metadata["schema"], str(target.model_file)), limit, pinned=True
        )
        X = check_features(X, model.n_features, model.input_range, "test data")
    else:
        X, labels = read_table(data, max_bytes=limit)
        if labels is None:
            raise FedfheError(f"{data}: no labels (need y in the .npz or a label column in the .csv)")
        X, y = check_features(X, model.n_features, model.input_range, "test data"), labels
        if len(y) != len(X):
            raise FedfheError(f"{data}: {len(y)} labels for {len(X)} rows")
    if not model.is_regression and not (known := np.isin(y, model.classes)).all():
        bad = y[~known][0]
        raise FedfheError(f"{data}: label {bad!r} is not one of the model's classes {[int(c) for c in model.classes]}")
    fhe_samples = fhe_samples_for(fhe_samples, len(y))
    progress.start("compiling")
    if operating_point is None:
        compiled = fhe.load_compiled(target.path, model)
    else:  # the artifacts are read (and checked against the model) before it changes
        artifacts = read_artifacts(target, model)
        model = _at_point(target, model, operating_point, X, y, positive_class, data)
        compiled = fhe.compile_as(model, artifacts)
        _replace_circuit(target, compiled)
    if data is None:
        summary = _evaluate(compiled, target.create(), X, y, fhe_samples, progress, positive_class)
        _rewrite_card(target)
        return summary
    elsewhere = evaluation_dir(target.path, data).create()
    return _evaluate(
        compiled, target, X, y, fhe_samples, progress, positive_class, elsewhere, str(Path(data).resolve())
    )


def evaluation_dir(run_dir: PathLike, data: PathLike) -> RunDir:
    """Where `evaluate --data FILE` reports: RUN/evaluations/<file name>/, or <file name>-2/, ... when
    that folder holds the report of another file of the same name."""
    source, name = str(Path(data).resolve()), Path(data).name
    folder, copy = RunDir(run_dir).evaluations / name, 1
    while (report := folder / "report.json").exists() and _source_of(report) != source:
        copy += 1
        folder = folder.with_name(f"{name}-{copy}")
    return RunDir(folder)


def _source_of(report: Path) -> str | None:
    """The file a report was made on (None for an unreadable report, which is then left alone)."""
    try:
        return json.loads(report.read_text()).get("evaluated_on")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class TuneResult:
    """Every measured point, the recommended one and why, and where its model now lives compiled."""

    points: list[dict[str, Any]]
    chosen: dict[str, Any]
    reason: str  # e.g. "narrowest circuit (12 bits) among the 3 points within 0.005 of the best AUC (0.99)"
    metric: tuning.Metric
    compiled: CompiledModel
    run: RunDir  # the run itself, or RUN/tune/NAME=VALUE when a retrained model won


def tune_run(
    run_dir: PathLike,
    n_bits: Sequence[NBits] = tuning.DEFAULT_GRID["n_bits"],
    latency_samples: int = 10,
    sweep: tuple[str, list[float]] | None = None,
    data_dir: PathLike | None = None,
    progress: Progress = QUIET,
    outputs: str | None = None,
    bit_pairs: bool = True,
    metric: str | None = None,
    positive_class: str | None = None,
) -> TuneResult:
    """Sweep n_bits (and one retrained parameter): `metric` in FHE simulation vs cost; compile the best point.

    The run's own model is never replaced (see `promote`): a parameter value is trained again, federated
    as the run was, into RUN/tune/NAME=VALUE, and the recommended point is compiled where its model lives.
    Every point is compiled for `outputs` (by default what the run was compiled for). With `bit_pairs`
    the recommended point's model is then measured at the input and weight widths one step from it.
    `metric` (tuning.NAMES; default: tuning.metric_for's) about `positive_class` (default: the model's).
    """
    from sklearn.model_selection import ParameterGrid

    check_n_bits(*n_bits)
    target = RunDir(run_dir)
    model = target.load_model()
    outputs = outputs or compiled_outputs(target, model)
    fhe.check_outputs(outputs, model.is_regression)
    if positive_class is not None:
        _check_positive(positive_class, model.is_regression, [int(c) for c in model.classes], model.class_names, None)
    scoring = tuning.metric_for(metric, model, outputs, positive_class)
    seed, allow = model.metadata["training"]["seed"], model.metadata["training"].get("allow_overlap", False)
    split = _split_of(target, model.metadata["dataset"], seed, data_dir, sweep is None, allow)
    if not 1 <= latency_samples <= len(split.y_test):
        raise FedfheError(f"--latency-samples must be between 1 and the {len(split.y_test)} test samples")
    grid: dict[str, list[Any]] = {"n_bits": sorted({bit_pair(n): n for n in n_bits}.values(), key=bit_pair)}
    retrain = None
    if sweep is not None:
        name, values = sweep
        grid[name] = sorted(set(values))
        _, config = target.read_config()
        configs = {v: dataclasses.replace(config, params={**config.params, name: v}) for v in grid[name]}
        for changed in configs.values():  # every setting is checked before any training starts
            changed.problem(split)

        def retrain(_: str, value: float) -> LinearModel:
            return training.train(split, configs[value], target.tuned(name, value).path, force=True)

    target.create()
    progress.start("tuning", len(ParameterGrid(grid)))
    X, y = split.X_test, split.y_test
    points = tuning.tune(model, X, y, grid, latency_samples, progress.update, retrain, outputs, scoring)
    chosen, reason = tuning.recommend(points, scoring)
    around = tuning.neighbours(points, chosen) if bit_pairs else []
    if around:
        best = model
        for name, value in chosen["param"].items():  # a retrained model: trained above, read back
            best = target.tuned(name, value).load_model()
        progress.start("input/weight bits", len(around))
        grid = {"n_bits": around}
        measured = tuning.tune(best, X, y, grid, latency_samples, progress.update, None, outputs, scoring)
        points += [{**p, "param": chosen["param"]} for p in measured]
        chosen, reason = tuning.recommend(points, scoring)
    tuning.write(target, points, chosen, reason, scoring)
    where = target
    for name, value in chosen["param"].items():  # a retrained model wins: compile it where it lives
        where = target.tuned(name, value)
    compiled = compile_run(where.path, chosen["n_bits"], progress=progress, outputs=outputs)
    return TuneResult(points, chosen, reason, scoring, compiled, where)


@dataclass(frozen=True)
class Promoted:
    """The sweep point now the run's model, its circuit, and where the model it replaced is kept."""

    point: dict[str, Any]
    compiled: CompiledModel
    previous: Path | None  # model.previous.npz, or RUN/tune/NAME=VALUE/ for a sweep model; None: nothing replaced


def promote(
    run_dir: PathLike, param: tuple[str, float], n_bits: NBits | None = None, progress: Progress = QUIET
) -> Promoted:
    """Make a point of `tune --sweep` the run's model, to serve it: the model retrained with `param`
    (at `n_bits`, by default its recommended point in tune.json) replaces model.npz, which is kept as
    model.previous.npz, unless that holds the run's own model already and the one replaced is a sweep
    model (which stays in RUN/tune/): no model is lost. It is compiled at the point's n_bits and
    outputs, the run's report removed and its card rewritten.
    """
    target = RunDir(run_dir)
    points, metric = tuning.read(target)
    name, value = param
    point = tuning.find(points, metric, {name: value}, n_bits)
    model, current = target.tuned(name, value).load_model(), target.load_model()
    previous = None
    if model.sha256 != current.sha256:
        if target.previous_model.exists():  # the run's own model, promoted away before: keep it unless ...
            folders = {target.tuned(*setting) for p in points for setting in p["param"].items()}
            swept = {f.load_model().sha256: f.path for f in folders if f.model_file.exists()}
            previous = swept.get(current.sha256)  # ... the current one would be lost (it is no sweep model)
        if previous is None:
            current.save(target.previous_model)
            previous = target.previous_model
        target.save_model(model)
    compiled = compile_run(target, point["n_bits"], progress=progress, model=model, outputs=point["outputs"])
    return Promoted(point, compiled, previous)


def _check_positive(
    value: str | None, regression: bool, classes: list[int], names: list[str], named: str | None
) -> None:
    """A two-class model has a positive class (--positive-class, else the one it names); checked before any work."""
    if regression or len(classes) != 2:
        if value is not None:
            raise FedfheError(
                f"--positive-class applies to two-class models; this one has {len(classes) or 'no'} classes"
            )
        return
    quality.positive_index(value, classes, names, named)


def _check_point(classes: list[int], names: list[str], positive_class: str | None, named: str | None) -> None:
    """An operating point needs two classes and a positive one; checked before any work."""
    decision.check_classes(len(classes))
    quality.positive_index(positive_class, classes, names, named)


def _at_point(
    target: RunDir,
    model: LinearModel,
    rule: decision.Rule,
    X: np.ndarray,
    y: np.ndarray,
    positive_class: str | None,
    data: PathLike | None,
) -> LinearModel:
    """The model at the operating point `rule` picks on these rows (the run's test split, or `data`), saved."""
    positive = quality.positive_index(
        positive_class, [int(c) for c in model.classes], model.class_names, model.metadata.get("positive_class")
    )
    if data is None:
        on, source = f"the run's {len(y)} held-out test rows", "test split"
    else:
        on, source = f"the {len(y)} rows of {Path(data).name}", str(Path(data).resolve())
    moved = decision.apply(model, rule, X, y, positive, on, source)
    moved.save(target.model_file)
    return moved


def _max_bytes(max_input_mb: float | None) -> int | None:
    """The --max-input-mb limit in bytes (None: no limit), refused unless positive."""
    if max_input_mb is None:
        return None
    if not max_input_mb > 0:
        raise FedfheError(f"--max-input-mb must be > 0 (got {max_input_mb})")
    return math.ceil(max_input_mb * MiB)


def _evaluate(
    compiled: CompiledModel,
    target: RunDir,
    X: np.ndarray,
    y: np.ndarray,
    fhe_samples: int,
    progress: Progress,
    positive_class: str | None = None,
    report_dir: RunDir | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """FHE evaluation with progress over the encrypted samples, then report.json/.md and the plot.

    The run's artifacts do the work; the report lands in `report_dir` (default: the run) and names `data`
    (default: the run's test split).
    """
    progress.start("fhe", fhe_samples)
    evaluation = fhe.evaluate(compiled, X, y, fhe_samples, target.fhe, progress.update)
    summary = report.build(compiled, evaluation, fhe_samples, data, positive_class)
    report.write(report_dir or target, summary, evaluation)
    return summary
