"""The operating point: a rule picks the threshold on held-out rows; the model, the client spec and a label circuit keep it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli, serving
from test_table import schema_file

from fedfhe import decision, fhe
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel
from fedfhe.table import Schema


def readmissions(path: Path, rows: int, seed: int, oncology: float) -> Path:
    """A hospital's table in which about 12% of stays end in readmission, a rare class a noisy risk decides."""
    rng = np.random.default_rng(seed)
    age, bmi = rng.integers(18, 95, rows), rng.uniform(15, 45, rows).round(1)
    ward = rng.choice(["cardiology", "oncology", "surgery"], rows, p=[(1 - oncology) / 2, oncology, (1 - oncology) / 2])
    risk = (age - 55) / 15 + (ward == "oncology") + (bmi - 30) / 6 + rng.normal(0, 1.5, rows)
    outcome = np.where(risk > 3.6, "readmitted", "discharged")
    patients = [f"p{seed}-{i}" for i in range(rows)]
    frame = pd.DataFrame({"patient": patients, "age": age, "ward": ward, "bmi": bmi, "outcome": outcome})
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "operating_point, threshold, message",
    [
        ("youden", 0.3, "--operating-point or --threshold, not both"),
        ("sensitivity", None, "--operating-point must be one of youden, sensitivity=F, specificity=F"),
        ("sensitivity=1", None, "F a fraction strictly between 0 and 1 (got 'sensitivity=1')"),
        ("specificity=x", None, "(got 'specificity=x')"),
        ("youden=0.5", None, "(got 'youden=0.5')"),
        (None, 0.0, "--threshold must be a score strictly between 0 and 1 (got 0)"),
        (None, math.nan, "--threshold must be a score strictly between 0 and 1"),
    ],
)
def test_bad_rules_are_one_line_errors(operating_point, threshold, message):
    with pytest.raises(FedfheError) as refused:
        decision.parse(operating_point, threshold)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_each_rule_picks_its_point_between_two_scores():
    rng = np.random.default_rng(0)
    hit = rng.random(400) < 0.15
    score = np.clip(rng.normal(0.3 + 0.25 * hit, 0.15), 0.001, 0.999)

    def rates(threshold: float) -> tuple[float, float]:
        flagged = score >= threshold
        return float(flagged[hit].mean()), float((~flagged[~hit]).mean())

    candidates = np.unique(score)  # every decision these rows allow: flag the rows scoring at least one of them
    table = np.array([rates(c) for c in candidates])
    youden = decision.choose(decision.Rule("youden"), score, hit)
    assert math.isclose(sum(rates(youden)) - 1, (table.sum(axis=1) - 1).max())
    assert not np.isin(youden, score)  # between two scores: no row sits on it
    sensitive = decision.choose(decision.Rule("sensitivity", 0.9), score, hit)
    reaching = table[table[:, 0] >= 0.9]
    assert rates(sensitive)[0] >= 0.9 and rates(sensitive)[1] == reaching[:, 1].max()
    specific = decision.choose(decision.Rule("specificity", 0.9), score, hit)
    keeping = table[table[:, 1] >= 0.9]
    assert rates(specific)[1] >= 0.9 and rates(specific)[0] == keeping[:, 0].max()
    assert decision.choose(decision.Rule("threshold", 0.25), score, hit) == 0.25
    with pytest.raises(FedfheError, match="needs rows of both classes"):
        decision.choose(decision.Rule("youden"), score, np.zeros(400, dtype=bool))


@pytest.mark.parametrize("positive", [0, 1])
def test_the_integer_cut_is_the_threshold_on_dequantized_scores(positive):
    rng = np.random.default_rng(positive)
    for threshold, scale in zip(rng.uniform(0.01, 0.99, 50), 10 ** rng.uniform(-5, -1, 50)):
        point = decision.Point(positive, float(threshold))
        cut = point.cut(float(scale))
        s = np.arange(cut - 3, cut + 3)
        p1 = 1 / (1 + np.exp(-scale * s))
        picked = point.picks(np.column_stack([1 - p1, p1]))
        assert picked.tolist() == [0, 0, 0, 1, 1, 1], (threshold, scale, positive)


def test_the_threshold_is_part_of_the_models_identity_and_how_it_was_chosen_is_not():
    model = LinearModel(np.array([[1.0, -2.0]]), np.array([0.5]), np.array([0, 1]), (0.0, 1.0), {})
    X, y = np.random.default_rng(0).uniform(0, 1, (60, 2)), np.arange(60) % 2
    moved = decision.apply(model, decision.Rule("threshold", 0.3), X, y, 1, "60 rows", "test split")
    assert moved.sha256 != model.sha256 and decision.point_of(moved) == decision.Point(1, 0.3)
    moved.metadata["operating_point_choice"]["on"] = "other rows"
    assert moved.sha256 == decision.apply(model, decision.Rule("threshold", 0.3), X, y, 1, "x", "y").sha256
    assert decision.describe(moved) == "1 when its score >= 0.3 (threshold given)"
    assert decision.describe(model) == "the most probable class (argmax)"
    with pytest.raises(FedfheError, match="apply to two-class models; this one has 3 classes"):
        decision.check_classes(3)
    for raw in (b"[]", b'{"positive": 2, "threshold": 0.5}', b'{"positive": 1, "threshold": 1.0}', b"{"):
        with pytest.raises(FedfheError, match="^server client spec: (refused|unreadable)"):
            decision.read_point(raw, "server client spec")


@pytest.mark.federation
@pytest.mark.fhe
def test_three_hospitals_with_rare_readmissions_get_an_operating_point_that_finds_them(tmp_path):
    owners = tmp_path / "owners"
    owners.mkdir()
    for seed, oncology in enumerate((0.2, 0.33, 0.5)):
        readmissions(owners / f"hospital-{'abc'[seed]}.csv", 400, seed, oncology)
    test, fresh = readmissions(tmp_path / "test.csv", 400, 7, 0.33), readmissions(tmp_path / "new.csv", 400, 8, 0.33)
    schema, run = schema_file(tmp_path), tmp_path / "run"
    args = ["--owners", str(owners), "--test", str(test), "--schema", schema, "--rounds", "5"]
    refused = cli("train", *args, "--run", str(run))  # 5 test stays equal 5 of hospital-a's: an age, a ward, a BMI
    assert refused.returncode == 2 and "test.csv: 5 of its 400 rows are also in the owners' files" in refused.stderr
    # other patients with equal values: trained on all the same, and said so
    done = cli("run", *args, "--allow-overlap", "--class-weight", "balanced", "--operating-point", "youden",
               "--fhe-samples", "5", "--run", str(run))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning: row hashes: 5 of the 400 test rows are also training rows" in " ".join(done.stderr.split())
    assert "decision: readmitted when its score >= " in done.stderr and "youden, chosen on the run's 400" in done.stderr
    report = json.loads((run / "report.json").read_text())
    figures = report["metrics"]
    assert 0.10 <= figures["prevalence"]["value"] <= 0.15, figures["prevalence"]
    assert figures["sensitivity"]["value"] >= 0.6 and figures["specificity"]["value"] >= 0.6, figures
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    model, parsed = LinearModel.load(run / "model.npz"), Schema.load(schema)
    X, y = zip(*(parsed.encode(pd.read_csv(f), f.name) for f in sorted(owners.iterdir())))
    X_test, y_test = parsed.encode(pd.read_csv(test), "test.csv")
    reference = LogisticRegression(class_weight="balanced", max_iter=1000)
    reference.fit(model.scale(np.vstack(X)), np.concatenate(y))
    central = roc_auc_score(y_test, reference.predict_proba(model.scale(X_test))[:, 1])
    assert abs(figures["auc"]["value"] - central) <= 0.02, (figures["auc"], central)
    # on rows it was not chosen on, the point holds; the client applies it to its decrypted scores
    done = cli("evaluate", "--run", str(run), "--data", str(fresh), "--fhe-samples", "0")
    assert done.returncode == 0, done.stderr
    elsewhere = json.loads((run / "evaluations" / "new.csv" / "report.json").read_text())["metrics"]
    assert elsewhere["sensitivity"]["value"] >= 0.6 and elsewhere["specificity"]["value"] >= 0.6, elsewhere
    assert "optimistic" not in elsewhere["decision"] and "optimistic" in figures["decision"]
    compiled = fhe.load_compiled(run, model)
    X_new = parsed.encode(pd.read_csv(fresh), "new.csv")[0]
    classes, proba = compiled.classify(X_new, "simulate")
    assert proba is not None
    moved = np.flatnonzero(classes != proba.argmax(axis=1))  # rows the point decides otherwise than argmax
    assert len(moved) > 0
    picked = np.r_[moved[:6], 0, 1]
    pd.read_csv(fresh).drop(columns="outcome").iloc[picked].to_csv(tmp_path / "rows.csv", index=False)
    with serving(run, tmp_path / "store", tmp_path / "server.log", "--workers", "1") as served:
        done = cli("predict", str(tmp_path / "rows.csv"), "--server", served.url, "--key-dir", str(tmp_path / "keys"),
                   "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [a["name"] for a in json.loads(done.stdout)] == [model.class_names[int(c)] for c in classes[picked]]
