"""Tuning a metric against FHE cost over quantization bits (and a retrained parameter), and serving a point."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, copy_of

from fedfhe import TrainConfig, fhe, quality, train, tuning
from fedfhe.artifacts import bit_pair, n_bits_label, parse_n_bits
from fedfhe.data import load_dataset
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel
from fedfhe.rundir import RunDir


@pytest.fixture(scope="module")
def central_model(tmp_path_factory, digits):
    return train(digits, TrainConfig(clients=1), tmp_path_factory.mktemp("central"))


@pytest.mark.fhe
def test_sweep_measures_every_point_and_recommends_the_cheapest_good_one(central_model, digits, tmp_path):
    metric = tuning.metric_for(None, central_model, "scores")
    assert metric.name == "balanced-accuracy"  # ten classes
    points = tuning.tune(central_model, digits.X_test, digits.y_test, {"n_bits": [3, 6]}, latency_samples=2)
    assert [p["n_bits"] for p in points] == [3, 6]
    for p in points:
        assert 0.5 < p["score"] <= 1 and p["server_ms"] > 0 and p["output_bytes"] > p["input_bytes"] / 10
        assert (p["bootstraps"], p["rows"], p["server_runs"]) == (0, len(digits.y_test), 2)
    assert points[0]["max_bit_width"] < points[1]["max_bit_width"]
    chosen, reason = tuning.recommend(points, metric)
    best = max(p["score"] for p in points)
    assert chosen["score"] >= best - tuning.TOLERANCE
    assert all(tuning.cost(p) >= tuning.cost(chosen) for p in points if p["score"] >= best - tuning.TOLERANCE)
    assert all(p["param"] == {} for p in points) and tuning.label(points[0]) == "3 bits"
    tuning.write(RunDir(tmp_path), points, chosen, reason, metric)
    tuned = json.loads((tmp_path / "tune.json").read_text())
    assert tuned["recommended"]["n_bits"] == chosen["n_bits"] and tuned["reason"] == reason
    assert tuned["metric"] == {"name": "balanced-accuracy", "title": "balanced accuracy", "higher_is_better": True,
                               "tolerance": 0.005, "tolerance_is": "absolute", "positive_class": None}  # fmt: skip
    table = (tmp_path / "tune.md").read_text()
    assert "(recommended)" in table and "| balanced accuracy |" in table and reason in table
    assert "the fastest of 2 real FHE runs" in table
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def point(n_bits, score, server_ms, bootstraps=0, width=None, **param):
    """A measured point as tuning.tune records it (the circuit's width grows with the bits unless given)."""
    inputs, weights = bit_pair(n_bits)
    return {"n_bits": n_bits, "score": score, "server_ms": server_ms, "bootstraps": bootstraps,
            "max_bit_width": width or inputs + weights + 6, "param": param}  # fmt: skip


@pytest.mark.parametrize(
    "points, metric, chosen, reason",
    [
        ([point(8, 0.900, 100.0), point(4, 0.897, 70.0), point(3, 0.896, 90.0), point(2, 0.800, 10.0)], "accuracy",
         2, "narrowest circuit (12 bits) among the 3 points within 0.005 of the best accuracy (0.9)"),
        ([point(6, 0.90, 9.0, bootstraps=2, width=8), point(8, 0.895, 50.0, width=22)], "auc",
         1, "fewest bootstraps (0) among the 2 points within 0.005 of the best AUC (0.9)"),
        ([point({"op_inputs": 4, "op_weights": 3}, 0.9, 1.0, width=13),
          point({"op_inputs": 3, "op_weights": 5}, 0.9, 9.0, width=13),
          point({"op_inputs": 3, "op_weights": 4}, 0.9, 5.0, width=13)], "balanced-accuracy",
         2, ("fewest input bits (3), then fewest weight bits (4) among the 3 points within 0.005 of the best "
            "balanced accuracy (0.9)")),
        ([point(4, 0.71, 2.6, C=0.1), point(2, 0.574, 1.0), point(8, 0.727, 5.7)], "auc",  # issue 30's sweep
         2, "the only point within 0.005 of the best AUC (0.727)"),
        ([point(4, 0.72, 5.7, C=10.0), point(4, 0.72, 2.6, C=0.1)], "pr-auc",
         1, "fastest server run (2.60 ms) among the 2 points within 0.005 of the best PR-AUC (0.72)"),
        ([point(4, 0.5, 3.0, C=1.0), point(4, 0.5, 3.0, C=2.0)], "accuracy",
         0, "the first measured of 2 identical points within 0.005 of the best accuracy (0.5)"),
        ([point(8, 40.0, 9.0), point(4, 40.39, 5.0), point(3, 40.5, 1.0)], "mae",
         1, "narrowest circuit (14 bits) among the 2 points within 1% of the best MAE (40)"),
    ],
)  # fmt: skip
def test_recommend_ranks_by_cost_within_the_tolerance_and_times_last(points, metric, chosen, reason):
    assert tuning.recommend(points, tuning.parse_metric(metric)) == (points[chosen], reason)


def test_an_error_metric_is_tabled_and_plotted_lower_is_better(tmp_path):
    mae = tuning.parse_metric("mae")
    points = [{**point(8, 40.0, 9.0), "rows": 89, "server_runs": 3, "input_bytes": 1, "output_bytes": 2},
              {**point(3, 45.0, 4.0), "rows": 89, "server_runs": 3, "input_bytes": 1, "output_bytes": 2}]  # fmt: skip
    chosen, reason = tuning.recommend(points, mae)
    tuning.write(RunDir(tmp_path), points, chosen, reason, mae)
    assert json.loads((tmp_path / "tune.json").read_text())["metric"]["tolerance_is"] == "relative to the best"
    table = (tmp_path / "tune.md").read_text()
    assert "| point | MAE |" in table and "MAE in FHE simulation on the same 89 test rows (lower is better" in table
    assert "| 8 bits **(recommended)** | 40 |" in table and (tmp_path / "pareto.png").is_file()


def test_a_score_exactly_at_the_tolerance_is_as_good():
    for metric, best, edge in (("auc", 0.9, 0.895), ("mae", 40.0, 40.4), ("r2", 0.3, 0.295)):
        m = tuning.parse_metric(metric)
        assert m.as_good(edge, best) and not m.as_good(edge + (-1e-6 if m.higher else 1e-6), best)


def model_of(classes, **metadata):
    """A model of these classes (none: a regressor) with this metadata: all that choosing a metric reads."""
    rows = len(classes) if len(classes) > 2 else 1
    kind = "logistic" if classes else "ridge"
    return LinearModel(
        np.zeros((rows, 2)), np.zeros(rows), np.array(classes, dtype=np.int64), (0.0, 1.0), metadata, kind
    )


NAMED = {"class_names": ["no", "yes"], "positive_class": "yes"}


@pytest.mark.parametrize(
    "classes, metadata, outputs, given, positive_class, name, about",
    [
        ([0, 1], NAMED, "scores", None, None, "auc", "yes"),  # the default for two classes: the model's positive
        ([0, 1], NAMED, "label", None, None, "balanced-accuracy", None),  # label outputs send no score
        ([0, 1, 2], {}, "scores", None, None, "balanced-accuracy", None),
        ([], {}, "scores", None, None, "r2", None),
        ([], {}, "scores", "mae", None, "mae", None),
        ([0, 1], NAMED, "scores", "AUC", None, "auc", "yes"),
        ([0, 1], NAMED, "scores", "sensitivity@specificity=0.90", None, "sensitivity@specificity=0.9", "yes"),
        ([0, 1], NAMED, "scores", "pr-auc", "no", "pr-auc", "no"),  # --positive-class overrides the model's
        ([0, 1], {}, "scores", "auc", "1", "auc", "1"),  # a model naming none: --positive-class names it
        ([0, 1], {}, "label", "accuracy", None, "accuracy", None),  # no positive class needed
    ],
)  # fmt: skip
def test_the_metric_defaults_to_the_models_kind_and_names_its_positive_class(
    classes, metadata, outputs, given, positive_class, name, about
):
    metric = tuning.metric_for(given, model_of(classes, **metadata), outputs, positive_class)
    assert (metric.name, metric.positive) == (name, about)


@pytest.mark.parametrize(
    "classes, metadata, outputs, given, message",
    [
        ([0, 1], NAMED, "scores", "f1", ("unknown metric 'f1'; choose one of: auc, pr-auc, balanced-accuracy, "
                                          "sensitivity@specificity=S, accuracy, r2, mae")),
        ([0, 1], NAMED, "scores", "pr_auc", "unknown metric 'pr_auc' (did you mean 'pr-auc'?)"),
        ([0, 1], NAMED, "scores", "sensitivity@specificity=1", "takes a fraction S between 0 and 1 (got 'sens"),
        ([0, 1], NAMED, "scores", "sensitivity@specificity=0", "takes a fraction S between 0 and 1"),
        ([0, 1], NAMED, "scores", "sensitivity@specificity=x", "takes a fraction S between 0 and 1"),
        ([0, 1], NAMED, "scores", "r2", ("--metric r2 applies to regressors; this model takes: auc, pr-auc, "
                                        "balanced-accuracy, sensitivity@specificity=S, accuracy")),
        ([0, 1, 2], {}, "scores", "mae", "--metric mae applies to regressors"),
        ([], {}, "scores", "auc", "--metric auc applies to classifiers; this model takes: r2, mae"),
        ([], {}, "scores", "accuracy", "--metric accuracy applies to classifiers"),
        ([0, 1, 2], {}, "scores", "auc", "--metric auc applies to two classes; this model has 3: use balanced-acc"),
        ([0, 1], NAMED, "label", "sensitivity@specificity=0.8", "needs scores; label outputs send the class only"),
        ([0, 1], {}, "scores", "auc", ("is about a positive class and the model names none: give --positive-class "
                                      "(0 or 1), or use balanced-accuracy or accuracy")),
        ([0, 1], {}, "scores", None, "--metric auc is about a positive class"),  # the default says which it is
    ],
)  # fmt: skip
def test_bad_metrics_are_refused_in_one_line(classes, metadata, outputs, given, message):
    with pytest.raises(FedfheError) as refused:
        tuning.metric_for(given, model_of(classes, **metadata), outputs)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_score_metric_needs_rows_of_both_classes():
    rows = np.array([[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(FedfheError, match="--metric auc needs test rows of yes and of another class"):
        tuning.tune(model_of([0, 1], **NAMED), rows, np.array([0, 0]), latency_samples=1)  # refused before compiling


def test_the_metrics_are_the_reports_figures_and_sensitivity_keeps_the_specificity():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    proba = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1).round(1)  # ties, as quantized scores have
    predicted = (proba > 0.5).astype(np.int64)
    figures = quality.classifier(y, predicted, np.column_stack([1 - proba, proba]), [0, 1], ["no", "yes"], 1, True)
    hit = y == 1
    assert tuning.parse_metric("auc").statistic(hit, proba) == pytest.approx(figures["auc"]["value"], abs=1e-12)
    assert tuning.parse_metric("pr-auc").statistic(hit, proba) == pytest.approx(figures["pr_auc"]["value"], abs=1e-12)
    balanced = tuning.parse_metric("balanced-accuracy").statistic(y, predicted)
    assert balanced == pytest.approx(figures["balanced_accuracy"]["value"], abs=1e-12)
    # 10 negatives scored 0.0 to 0.9, 4 positives at 0.85, 0.75, 0.35, 0.05: at specificity 0.9 one false alarm
    hit = np.array([False] * 10 + [True] * 4)
    score = np.r_[np.arange(10) / 10, 0.85, 0.75, 0.35, 0.05]
    assert tuning.parse_metric("sensitivity@specificity=0.9").statistic(hit, score) == 0.25  # flagged from 0.85
    assert tuning.parse_metric("sensitivity@specificity=0.5").statistic(hit, score) == 0.5  # from 0.75 (or 0.5)
    assert tuning.parse_metric("sensitivity@specificity=0.4").statistic(hit, score) == 0.75  # from 0.35
    mae = tuning.parse_metric("mae")
    assert (mae.higher, mae.statistic(np.array([1.0, 2.0]), np.array([2.0, 4.0]))) == (False, 1.5)


@pytest.mark.parametrize("text, n_bits", [("6", 6), ("6/4", {"op_inputs": 6, "op_weights": 4}), (" 5 / 5", 5)])
def test_n_bits_are_written_n_or_inputs_slash_weights(text, n_bits):
    assert parse_n_bits(text) == n_bits and parse_n_bits(n_bits_label(n_bits)) == n_bits


@pytest.mark.parametrize(
    "text, message",
    [("x", "takes N or INPUTS/WEIGHTS"), ("6/4/2", "takes N or"), ("6/", "takes N or"), ("-4", "takes N or"),
     ("6/1", r"between 2 and 12 \(got 6/1\)"), ("13", r"between 2 and 12 \(got 13\)")],
)  # fmt: skip
def test_bad_n_bits_are_refused_in_one_line(text, message):
    with pytest.raises(FedfheError, match=message):
        parse_n_bits(text)


def test_neighbours_are_the_unmeasured_widths_one_step_from_the_choice():
    points = [{"n_bits": b, "param": {}} for b in (2, 3, 4, 5)] + [{"n_bits": 4, "param": {"C": 10.0}}]
    around = tuning.neighbours(points, points[2])
    assert sorted(map(bit_pair, around)) == [(3, 4), (3, 5), (4, 3), (4, 5), (5, 3), (5, 4)]
    assert tuning.neighbours(points, points[0]) == [
        {"op_inputs": 2, "op_weights": 3},
        {"op_inputs": 3, "op_weights": 2},
    ]
    assert len(tuning.neighbours(points, points[4])) == 8  # another model: only its own point was measured


def test_bad_tuning_requests(central_model, digits):
    with pytest.raises(FedfheError, match="--latency-samples must be between 1 and the 360"):
        tuning.tune(central_model, digits.X_test, digits.y_test, {"n_bits": [4]}, latency_samples=0)
    with pytest.raises(FedfheError, match="--n-bits must be between 2 and 12"):
        tuning.tune(central_model, digits.X_test, digits.y_test, {"n_bits": [1]}, latency_samples=1)


SWEPT = "sensitivity@specificity=0.9"  # what the sweep below is tuned for


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, str, bytes]:
    """A breast-cancer SVM run (3 clients, 1 round) tuned with a C sweep for SWEPT: the run, the console, its model before."""
    run = tmp_path_factory.mktemp("swept") / "run"
    args = ["--dataset", "breast-cancer", "--model", "svm", "--clients", "3", "--rounds", "1", "--local-iters", "5"]
    assert cli("train", *args, "--out", str(run)).returncode == 0
    before = (run / "model.npz").read_bytes()
    done = cli("tune", "--run", str(run), "--n-bits", "3,6", "--sweep", "C=0.01,1", "--latency-samples", "2",
               "--metric", SWEPT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return run, done.stderr, before


@pytest.mark.federation
@pytest.mark.fhe
@pytest.mark.xdist_group("swept")
def test_sweep_retrains_per_regularisation_value_scored_by_the_metric_without_touching_the_run(swept):
    run, console, before = swept
    tuned = json.loads((run / "tune.json").read_text())
    metric = tuning.parse_metric(SWEPT)
    assert tuned["metric"] == {**metric.record(), "positive_class": "malignant"}  # the class the data set names
    grid, around = tuned["points"][:4], tuned["points"][4:]
    assert sorted((p["param"]["C"], p["n_bits"]) for p in grid) == [(0.01, 3), (0.01, 6), (1, 3), (1, 6)]
    first, _ = tuning.recommend(grid, metric)  # then its model, read back from RUN/tune/, at widths one step from it
    assert around and all(p["param"] == first["param"] for p in around)
    assert {bit_pair(p["n_bits"]) for p in around} == {bit_pair(n) for n in tuning.neighbours(grid, first)}
    assert {p["rows"] for p in tuned["points"]} == {114} and {p["server_runs"] for p in tuned["points"]} == {2}
    chosen, reason = tuning.recommend(tuned["points"], metric)
    assert (tuned["recommended"], tuned["reason"]) == (chosen, reason)
    assert f"of the best sensitivity at specificity 0.9 ({max(p['score'] for p in tuned['points']):.4g})" in reason
    assert f"recommended {tuning.label(chosen)} (*): {reason}; compiled in" in console
    assert f"to serve it: fedfhe tune --run {run} --promote C={chosen['param']['C']:g}" in console
    assert (
        reason in (run / "tune.md").read_text()
        and "| sensitivity at specificity 0.9 |" in (run / "tune.md").read_text()
    )
    for value in ("0.01", "1"):
        assert (run / "tune" / f"C={value}" / "model.npz").is_file()
    assert (run / "tune" / f"C={chosen['param']['C']:g}" / "fhe" / "client.zip").is_file()
    assert (run / "model.npz").read_bytes() == before  # the run's own model is replaced only by --promote
    for sweep, message in (("max_iter=10,20", "--param max_iter applies to centralized"), ("C=x", "NAME=V1,V2")):
        done = cli("tune", "--run", str(run), "--sweep", sweep)
        assert done.returncode == 2 and message in done.stderr


@pytest.mark.federation
@pytest.mark.fhe
@pytest.mark.xdist_group("swept")
def test_promote_makes_a_sweep_point_the_runs_model_keeping_the_one_it_replaced(swept, tmp_path):
    run = copy_of(swept[0], tmp_path)
    for step in (["compile", "--n-bits", "8"], ["evaluate", "--fhe-samples", "0"], ["card"]):
        assert cli(*step[:1], "--run", str(run), *step[1:]).returncode == 0  # a report and card of the old model
    done = cli("tune", "--run", str(run), "--promote", "C=0.01", "--n-bits", "3")
    assert done.returncode == 0, done.stderr
    assert "3 bits C=0.01 is now the run's model" in done.stderr and "model.previous.npz" in done.stderr
    promoted, old = LinearModel.load(run / "model.npz"), LinearModel.load(run / "model.previous.npz")
    assert promoted.sha256 == LinearModel.load(run / "tune" / "C=0.01" / "model.npz").sha256
    assert old.sha256 == LinearModel.load(swept[0] / "model.npz").sha256  # nothing lost
    info = json.loads((run / "fhe" / "fhe.json").read_text())
    assert (info["model_sha256"], info["n_bits"], info["outputs"]) == (promoted.sha256, 3, "scores")
    assert not (run / "report.json").exists() and not (run / "report.md").exists()  # they were of the old model
    card = json.loads((run / "card.json").read_text())
    spec = hashlib.sha256((run / "fhe" / "client.zip").read_bytes()).hexdigest()
    assert (card["pin"], card["training"]["params"]["C"]) == (f"{promoted.sha256}:{spec}", 0.01)
    recorded = next(p for p in json.loads((run / "tune.json").read_text())["points"]
                    if p["param"] == {"C": 0.01} and p["n_bits"] == 3)  # fmt: skip
    split, metric = load_dataset("breast-cancer", seed=0), tuning.metric_for(SWEPT, promoted, "scores")
    served = fhe.load_compiled(run, promoted)  # what `serve` will run scores what tune recorded for the point
    assert metric.score(served, split.X_test, split.y_test) == recorded["score"]
    again = cli("tune", "--run", str(run), "--promote", "C=1")  # at its recommended width
    assert again.returncode == 0, again.stderr
    assert f"the model it replaced is kept in {run / 'tune' / 'C=0.01'}" in again.stderr  # a sweep model stays
    assert LinearModel.load(run / "model.previous.npz").sha256 == old.sha256  # and the run's own is never lost
    assert LinearModel.load(run / "model.npz").sha256 == LinearModel.load(run / "tune" / "C=1" / "model.npz").sha256
    done = cli("tune", "--run", str(run), "--promote", "C=3")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "tune.json has no point C=3; its --sweep points: C=0.01 at n_bits 3, 6" in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "auc"], "--metric auc applies to two classes; this model has 10: use balanced-accuracy"),
        (["--metric", "mae"], "--metric mae applies to regressors"),
        (["--metric", "f1"], "unknown metric 'f1'; choose one of: auc, pr-auc, balanced-accuracy, sensitivity@"),
        (["--metric", "sensitivity@specificity=1.5"], "takes a fraction S between 0 and 1"),
        (["--positive-class", "3"], "--positive-class applies to two-class models"),
        (["--promote", "C=1"], "tune.json not found: fedfhe tune --run"),
        (["--promote", "C=1,10"], "--promote takes one NAME=VALUE"),
        (["--promote", "C"], "--promote must look like NAME=VALUE with numbers (got 'C')"),
        (["--promote", "C=1", "--metric", "auc"], "--promote takes --n-bits only"),
        (["--promote", "C=1", "--n-bits", "3,4"], "--n-bits takes N or INPUTS/WEIGHTS"),
    ],
)
def test_bad_tune_options_are_refused_in_one_line(served_run, args, message):
    done = cli("tune", "--run", str(served_run), *args)  # digits: ten classes; refused before anything is written
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (served_run / "tune.json").exists()
