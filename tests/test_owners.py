"""One file per data owner: each a client, trained, compiled without data, served; raw CSV rows predicted encrypted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import ENV, FEDFHE, Served, answers_equal_concretes, cli, copy_of, fedfhe, free_port, serving, wait_for
from test_exports import admissions, export_a, export_b, export_c
from test_table import STAY_SCHEMA, hospital, schema_file, stay

from fedfhe import TrainConfig, drafting, pipeline, table
from fedfhe.errors import FedfheError
from fedfhe.fhe import load_compiled
from fedfhe.kinds import KINDS
from fedfhe.model import LinearModel
from fedfhe.problem import merge_ranges, shared_range
from fedfhe.rundir import SPEC_OBSERVED
from fedfhe.service.client import EncryptedClient

SKEWS = {"hospital-a.csv": (0.9, 0.05, 0.05), "hospital-b.csv": (0.05, 0.9, 0.05), "hospital-c.csv": (0.05, 0.05, 0.9)}


def _hospitals(root: Path) -> None:
    (root / "owners").mkdir(parents=True)
    for seed, (name, wards) in enumerate(SKEWS.items()):
        hospital(root / "owners" / name, rows=200, seed=seed, wards=wards)
    hospital(root / "test.csv", rows=150, seed=9)
    schema_file(root)


@pytest.fixture(scope="session")
def hospitals(once) -> tuple[Path, Path, Path]:
    """Three hospitals' CSV files with label skew (each mostly one ward), the server's test file, the schema.

    Shared by every worker, read-only: a test that moves a file works on a copy.
    """
    root = once("hospitals", _hospitals)
    return root / "owners", root / "test.csv", root / "schema.json"


def _stays(root: Path) -> None:
    (root / "owners").mkdir(parents=True)
    for seed in (1, 2):
        stay(root / "owners" / f"clinic-{seed}.csv", rows=150, seed=seed)
    stay(root / "test.csv", rows=100, seed=3)
    (root / "schema.json").write_text(json.dumps(STAY_SCHEMA))


@pytest.fixture(scope="session")
def stays(once) -> tuple[Path, Path, Path]:
    """Two owners' length-of-stay tables (a regression), a test file and their schema."""
    root = once("stays", _stays)
    return root / "owners", root / "test.csv", root / "schema.json"


@pytest.fixture(scope="session")
def owners_run(once, hospitals) -> Path:
    """`fedfhe run --owners DIR --test FILE --schema S --class-weight balanced`: one client per hospital, compiled,
    evaluated in FHE."""
    owners, test, schema = hospitals

    def build(out: Path) -> None:
        done = cli("run", "--owners", str(owners), "--test", str(test), "--schema", str(schema),
                   "--rounds", "3", "--class-weight", "balanced", "--fhe-samples", "10", "--out", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr

    return once("owners-run", build)


@pytest.fixture(scope="module")
def owners_server(owners_run, tmp_path_factory) -> Iterator[Served]:
    """One `fedfhe serve` of the owners' run for this module's tests, one FHE worker."""
    tmp = tmp_path_factory.mktemp("owners-server")
    with serving(owners_run, tmp / "store", tmp / "server.log", "--workers", "1") as served:
        yield served


@pytest.mark.federation
@pytest.mark.fhe
def test_each_owner_file_is_one_client(owners_run, hospitals, tmp_path):
    owners, test, _ = hospitals
    model = LinearModel.load(owners_run / "model.npz")
    assert model.metadata["training"]["clients"] == 3  # the file count: --clients was left out
    assert model.metadata["n_train"] == 600 and model.metadata["n_test"] == 150
    readmitted, shared = [], []
    for i, name in enumerate(SKEWS):  # each client trained on exactly its owner's rows, in the file's order
        with np.load(owners_run / "partitions" / f"client-{i}.npz") as part:
            X, _ = table.Schema.load(owners_run / "schema.json").encode(pd.read_csv(owners / name), name)
            np.testing.assert_array_equal(part["X"], X)
            readmitted.append(part["y"].mean())
            shared.append(shared_range(X))
    assert max(readmitted) - min(readmitted) > 0.25, readmitted  # the owners' label skew reached the clients
    observed = model.observed_range  # what each owner shared, merged: the test rows are not in it
    assert observed is not None and np.array_equal(observed, merge_ranges(shared))
    assert observed[0].tolist() == [18, 0, 0, 0, 15] and observed[1][0] == 94  # declared: age 0-120, bmi 10-60
    assert model.metadata["metrics"]["final"]["score"] > 0.8
    report = json.loads((owners_run / "report.json").read_text())
    agreement = dict(report["agreement"])  # FHE equals the clear quantized model; quantization may move a near-tie
    assert agreement.pop("fhe_vs_sklearn") >= 0.98 and set(agreement.values()) == {1.0}, report["agreement"]
    source = json.loads((owners_run / "train_config.json").read_text())["source"]
    assert source == {"owners": str(owners.resolve()), "test": str(test.resolve())}
    assert report["class_names"] == ["discharged", "readmitted"]
    metrics = report["metrics"]  # on the FHE outputs, with intervals; the positive class the schema names
    assert metrics["positive_class"] == "readmitted" and metrics["auc"]["rows"] == 150
    found = {
        "training_rows": 600,
        "test_rows": 150,
        "test_in_training": 0,
        "training_duplicates": 3,
        "test_duplicates": 0,
    }
    assert model.metadata["leakage"] == report["leakage"] == found  # by row hashes: no test row trained on
    assert metrics["auc"]["low"] <= metrics["auc"]["value"] <= metrics["auc"]["high"]
    shown = (owners_run / "report.md").read_text()
    assert (owners_run / "roc.png").is_file() and "| sensitivity (recall of readmitted) |" in shown
    assert f"| prevalence of readmitted | {metrics['prevalence']['value']:.4g} |" in shown
    filled = "hospital-a.csv: bmi 4; hospital-b.csv: bmi 4; hospital-c.csv: bmi 4; test.csv (test): bmi 3"
    assert f"Missing cells in training, filled as the schema declares: {filled} (bmi: filled with 25)." in shown
    assert model.metadata["filled"]["test.csv (test)"] == {"bmi": 3}
    assert "row hashes (sha256 of each encoded row with its label): 0 of the 150 test rows are also training" in shown
    run = copy_of(owners_run, tmp_path)
    again = cli("evaluate", "--run", str(run), "--fhe-samples", "5", "--data", str(test))
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "report.json").read_text()) == report  # its own report, beside the run's
    external = json.loads((run / "evaluations" / "test.csv" / "report.json").read_text())
    assert external["evaluated_on"] == str(test.resolve()) and external["n_test"] == 150
    assert "leakage" not in external  # the counts are about the run's own test rows, not this file's


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
@pytest.mark.federation
@pytest.mark.fhe
def test_compile_and_evaluate_move_the_operating_point_without_retraining(owners_run, hospitals, served_run, tmp_path):
    owners_run = copy_of(owners_run, tmp_path)
    assert cli("card", "--run", str(owners_run)).returncode == 0
    before = LinearModel.load(owners_run / "model.npz")
    done = cli("compile", "--run", str(owners_run), "--operating-point", "sensitivity=0.9")
    assert done.returncode == 0, done.stderr
    model = LinearModel.load(owners_run / "model.npz")
    assert np.array_equal(model.coef, before.coef) and model.sha256 != before.sha256  # same weights, another model
    choice = model.metadata["operating_point_choice"]
    assert choice["rule"] == "sensitivity=0.9" and choice["sensitivity"] >= 0.9 and choice["rows"] == 150
    assert not (owners_run / "report.json").exists()  # it described the circuit replaced
    card = (owners_run / "card.md").read_text()
    assert f"Decision: readmitted when its score >= {model.metadata['operating_point']['threshold']:.4g}" in card
    assert model.sha256 in card
    _, test, _ = hospitals
    done = cli("evaluate", "--run", str(owners_run), "--data", str(test), "--threshold", "0.7", "--fhe-samples", "0")
    assert done.returncode == 0, done.stderr
    assert "decision: readmitted when its score >= 0.7 (threshold given)" in done.stderr
    assert LinearModel.load(owners_run / "model.npz").metadata["operating_point"]["threshold"] == 0.7
    for run, args, message in [
        (served_run, ["--threshold", "0.3"], "apply to two-class models; this one has 10 classes"),
        (
            owners_run,
            ["--operating-point", "youden", "--positive-class", "sick"],
            "--positive-class 'sick' is not a class",
        ),
    ]:
        done = cli("compile", "--run", str(run), *args)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_model_card_names_what_answers_and_predict_pins_it(owners_run, owners_server, hospitals, tmp_path):
    owners_run = copy_of(owners_run, tmp_path)  # the card is written into the run
    done = cli("card", "--run", str(owners_run))
    assert done.returncode == 0, done.stderr
    card = json.loads((owners_run / "card.json").read_text())
    model = LinearModel.load(owners_run / "model.npz")
    assert card["model"]["sha256"] == model.sha256 and card["model"]["training_rows"] == 600
    names = ["age", "ward=cardiology", "ward=oncology", "ward=surgery", "bmi"]
    assert [(f["position"], f["name"], f["high"]) for f in card["features"]] == list(
        zip(range(5), names, [120, 1, 1, 1, 60])
    )
    low, high = model.observed_range  # beside each declared range, the owners' observed one
    assert [(f["observed_low"], f["observed_high"]) for f in card["features"]] == list(zip(low, high))
    shown = (owners_run / "card.md").read_text()
    assert "| position | input | declared low | declared high | observed low | observed high |" in shown
    assert f"| 0 | age | 0 | 120 | 18 | {high[0]:g} |" in shown and "is extrapolation, and is flagged" in shown
    assert card["classes"] == [{"class": 0, "name": "discharged"}, {"class": 1, "name": "readmitted"}]
    assert card["missing_values"]["rules"] == ["bmi: filled with 25"]
    assert "'?' are missing; bmi: filled with 25. Cells filled in training: hospital-a.csv: bmi 4;" in shown
    assert card["training"]["clients"] == 3 and card["training"]["dp"] is False
    spec = (owners_run / "fhe" / "client.zip").read_bytes()
    assert card["fhe"]["client_spec_sha256"] == hashlib.sha256(spec).hexdigest()
    assert card["evaluation"]["rows"] == 150 and card["evaluation"]["agreement"]["fhe_vs_clear"] == 1.0
    auc = card["evaluation"]["figures"]["auc"]
    assert (
        auc["low"] <= auc["value"] <= auc["high"]
        and "- AUC (readmitted scored above discharged): " in (owners_run / "card.md").read_text()
    )
    assert card["model"]["positive_class"] == "readmitted"
    assert any("No differential privacy" in limit for limit in card["limits"])
    assert card["pin"] == f"{model.sha256}:{card['fhe']['client_spec_sha256']}"
    assert f"--expect-model {card['pin']} " in (owners_run / "card.md").read_text()
    _, test, _ = hospitals
    pd.read_csv(test).head(2).to_csv(tmp_path / "rows.csv", index=False)
    url = owners_server.url  # serving the run the card describes
    info = httpx.get(f"{url}/v1/model").json()
    assert info["feature_names"] == names and info["class_names"] == ["discharged", "readmitted"]
    wrong = "0" * 64
    refused = cli("predict", str(tmp_path / "rows.csv"), "--server", url, "--key-dir",
                  str(tmp_path / "wrong"), "--expect-model", wrong)  # fmt: skip
    assert refused.returncode == 2 and "not the expected 000000000000: nothing was sent" in refused.stderr
    assert not (tmp_path / "wrong").exists()
    pinned = cli("predict", str(tmp_path / "rows.csv"), "--server", url, "--key-dir",
                 str(tmp_path / "keys"), "--expect-model", card["pin"], "--json")  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr
    assert [row["name"] for row in json.loads(pinned.stdout)] == [row["class"] for row in json.loads(pinned.stdout)]
    with zipfile.ZipFile(owners_run / "fhe" / "client.zip") as served:
        assert SPEC_OBSERVED in served.namelist()
    with EncryptedClient(url, tmp_path / "keys") as client:  # read from the spec it pinned
        assert client.observed is not None and np.array_equal(client.observed, (low, high))
    bad = cli("predict", str(tmp_path / "rows.csv"), "--expect-model", "abc")
    assert bad.returncode == 2 and "64 hex digits" in bad.stderr
    bad = cli("predict", str(tmp_path / "rows.csv"), "--expect-model", f"{model.sha256}:abc")
    assert bad.returncode == 2 and "SPEC a client spec's sha256, 64 hex digits (got 'abc')" in bad.stderr
    bad = cli("predict", str(tmp_path / "rows.csv"), "--expect-model", card["pin"], "--expect-spec", "0" * 64)
    assert bad.returncode == 2 and "--expect-model pins one client spec and --expect-spec another" in bad.stderr


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_raw_csv_rows_are_predicted_under_encryption_with_the_schemas_classes(
    owners_run, owners_server, hospitals, tmp_path
):
    _, test, schema = hospitals
    rows = pd.read_csv(test).head(6)  # as the partner lab holds them: an id, a text ward, the outcome column
    rows.to_csv(tmp_path / "rows.csv", index=False)
    encoded, _ = table.Schema.load(schema).encode(rows, "rows", labelled=False)
    model = LinearModel.load(owners_run / "model.npz")
    simulated = load_compiled(owners_run, model).predict(encoded, fhe="simulate")
    expected = [["discharged", "readmitted"][int(c)] for c in simulated]
    url = owners_server.url
    done = fedfhe("predict", str(tmp_path / "rows.csv"), "--server", url, "--key-dir",
                  str(tmp_path / "keys"), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "KeySetCache" not in done.stderr  # the runtime's own line stays out of the user's way
    answers = json.loads(done.stdout)
    assert [a["class"] for a in answers] == expected
    assert set(answers[0]["scores"]) == {"discharged", "readmitted"}
    with EncryptedClient(url, tmp_path / "keys") as client:  # the API takes the DataFrame itself
        assert client.predict(rows.drop(columns=["outcome"])).predicted.tolist() == expected
    answers_equal_concretes(url, tmp_path / "keys", rows.drop(columns=["outcome"]).head(3))
    bad = rows.head(1).assign(ward="dermatology")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    refused = cli("predict", str(tmp_path / "bad.csv"), "--server", url, "--key-dir",
                  str(tmp_path / "keys"))  # fmt: skip
    assert refused.returncode == 2 and "'dermatology' is not one of its categories" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def lab_file(test: Path, path: Path) -> pd.DataFrame:
    """A partner lab's 8 rows as it holds them, written to `path`: identifiers with leading zeros; row 2's age and
    row 8's BMI outside the declared ranges, row 4's ward misspelt, row 5's age missing (each refused); row 6's
    BMI missing (the schema fills 25), row 7's age 100, beyond the 18-94 the owners observed."""
    lab = pd.read_csv(test).head(8).drop(columns=["outcome"]).astype({"age": float})
    lab["patient"] = [f"00{i}" for i in range(1, 9)]
    changes = [
        (2, "age", 130),
        (4, "ward", "oncolgy"),
        (5, "age", None),
        (6, "bmi", None),
        (7, "age", 100),
        (8, "bmi", 75),
    ]
    for row, column, value in changes:
        lab.loc[row - 1, column] = value
    lab.to_csv(path, index=False)
    return lab


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_a_labs_invalid_rows_are_refused_at_once_or_skipped_to_rejects_under_the_files_row_numbers(
    owners_run, owners_server, hospitals, tmp_path
):
    _, test, schema = hospitals
    lab = lab_file(test, tmp_path / "lab.csv")
    common = ["predict", str(tmp_path / "lab.csv"), "--server", owners_server.url, "--key-dir",
              str(tmp_path / "keys"), "--keep", "patient"]  # fmt: skip
    refused = cli(*common, "--out", str(tmp_path / "preds.csv"))
    *listed, error = refused.stderr.strip().splitlines()  # every bad row at once, the one-line error last
    assert refused.returncode == 2 and error.startswith(f"error: {tmp_path / 'lab.csv'}: 4 of 8 row(s) refused")
    assert [line.split(", column")[0].rsplit(" ", 1)[1] for line in listed] == ["2", "4", "5", "8"], listed
    assert not list(tmp_path.glob("preds.csv*"))  # nothing encrypted, nothing written
    skip = [*common, "--on-invalid", "skip", "--rejects", str(tmp_path / "rejects.csv")]
    done = cli(*skip, "--out", str(tmp_path / "preds.csv"))
    assert done.returncode == 0, done.stderr
    assert f"4 of 8 row(s) skipped as invalid (4 problem(s), written to {tmp_path / 'rejects.csv'})" in done.stderr
    preds, rejects = (pd.read_csv(tmp_path / f, dtype=str, keep_default_na=False) for f in ("preds.csv", "rejects.csv"))
    assert preds["row"].tolist() == ["1", "3", "6", "7"] and rejects["row"].tolist() == ["2", "4", "5", "8"]
    for written in (preds, rejects):  # each row's own identifier, as the file spells it
        assert written["patient"].tolist() == [lab["patient"][int(row) - 1] for row in written["row"]]
    assert rejects.columns.tolist() == ["row", "patient", "column", "value", "reason"]
    assert rejects[["column", "value"]].to_numpy().tolist() == [
        ["age", "130.0"], ["ward", "oncolgy"], ["age", ""], ["bmi", "75.0"]
    ]  # fmt: skip
    assert "outside its declared range [0, 120]" in rejects["reason"][0] and "missing value" in rejects["reason"][2]
    assert preds.columns.tolist()[:6] == ["row", "patient", "class", "name", "filled", "outside_observed"]
    assert preds[["filled", "outside_observed"]].to_numpy().tolist() == [["", ""], ["", ""], ["bmi", ""], ["", "age"]]
    rows = table.Schema.load(schema).rows(table.read_frame(tmp_path / "lab.csv"), "lab", labelled=False)
    simulated = load_compiled(owners_run, LinearModel.load(owners_run / "model.npz")).predict(
        rows.X[rows.valid], fhe="simulate"
    )
    assert preds["class"].tolist() == [["discharged", "readmitted"][int(c)] for c in simulated]
    shown = cli(*skip, "--json")
    record = json.loads(shown.stdout)[2]
    assert list(record) == ["row", "patient", "class", "name", "scores", "filled", "outside_observed"]
    assert (record["row"], record["patient"], record["filled"], record["outside_observed"]) == (6, "006", ["bmi"], [])
    table_shown = cli(*skip).stdout
    assert "notes" in table_shown and "filled: bmi" in table_shown and "outside observed: age" in table_shown
    assert "007" in table_shown and "002" not in table_shown
    for options, message in [
        (["--keep", "nope"], "--keep nope: " + str(tmp_path / "lab.csv") + " has no such column"),
        (["--keep", "age"], "--keep age: one of the model's inputs"),
        (["--on-invalid", "skip"], "--on-invalid skip writes the rows it leaves out to --rejects FILE"),
        (["--on-invalid", "maybe"], "--on-invalid must be refuse or skip"),
        (["--on-invalid", "skip", "--rejects", str(tmp_path / "r.txt")], "write rejected rows to a .csv file"),
    ]:
        bad = cli(*common, *options)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_the_api_keeps_a_frames_index_and_can_skip_invalid_rows(owners_server, hospitals, tmp_path):
    _, test, _ = hospitals
    lab = lab_file(test, tmp_path / "lab.csv").set_index("patient")  # the ids as the index: never sent
    with EncryptedClient(owners_server.url, tmp_path / "keys") as client:
        with pytest.raises(table.InvalidRows) as refused:
            client.predict(lab)
        assert [p.row for p in refused.value.problems] == [2, 4, 5, 8]
        result = client.predict(lab, on_invalid="skip")
        assert result.index.tolist() == ["001", "003", "006", "007"] and result.rows.tolist() == [1, 3, 6, 7]
        assert [(p.row, p.column) for p in result.skipped] == [(2, "age"), (4, "ward"), (5, "age"), (8, "bmi")]
        assert result.filled == ((), (), ("bmi",), ()) and result.outside_observed == ((), (), (), ("age",))
        valid = client.predict(lab.iloc[[0, 2, 5, 6]])  # the same rows alone: the same answers
        assert valid.predicted.tolist() == result.predicted.tolist() and valid.rows.tolist() == [1, 2, 3, 4]
        with pytest.raises(FedfheError, match="numbers are checked whole"):
            client.predict(np.zeros((1, 5)), on_invalid="skip")


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_predict_waits_for_a_server_started_after_it(owners_run, hospitals, tmp_path):
    _, test, _ = hospitals
    pd.read_csv(test).head(2).to_csv(tmp_path / "rows.csv", index=False)
    port = free_port()
    command = [*FEDFHE, "predict", str(tmp_path / "rows.csv"), "--server", f"http://127.0.0.1:{port}",
               "--key-dir", str(tmp_path / "keys"), "--wait", "60", "--json"]  # fmt: skip
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        client = subprocess.Popen(command, stdout=out, stderr=err, env=ENV)
    try:
        wait_for(lambda: "waiting up to 60 s" in (tmp_path / "err").read_text(), 60, "predict to wait")
        with serving(owners_run, tmp_path / "store", tmp_path / "server.log", "--workers", "1", port=port):
            assert client.wait(timeout=120) == 0, (tmp_path / "err").read_text()
    finally:
        client.kill()
        client.wait()
    assert [a["row"] for a in json.loads((tmp_path / "out").read_text())] == [1, 2]


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind_trains_from_data_and_owners_compiles_exactly_and_serves_raw_rows(
    kind, hospitals, stays, tmp_path
):
    owners, test, schema_path = hospitals if not KINDS[kind].regression else stays
    schema = table.Schema.load(schema_path)
    for name, data, config in [
        ("data", table.load(test, schema), TrainConfig(clients=1, model=kind)),
        ("owners", table.load_owners(owners, test, schema), TrainConfig(clients=len(table.owner_files(owners)),
                                                                        rounds=2, model=kind)),
    ]:  # fmt: skip
        result = pipeline.run(data, config, tmp_path / name, fhe_samples=5)
        agreement = result.summary["agreement"]
        assert agreement["fhe_vs_clear"] == agreement["execute_vs_simulate"] == 1.0, (name, agreement)
        assert result.model.metadata["schema"] == schema.to_dict()
    rows = pd.read_csv(test).head(3)  # the owners' model, served: raw rows in, the schema's values out
    encoded, _ = schema.encode(rows, "rows", labelled=False)
    simulated = result.compiled.predict(encoded, fhe="simulate")
    if schema.label.classes:
        simulated = np.asarray(schema.label.classes)[simulated.astype(int)]
    with (
        serving(tmp_path / "owners", tmp_path / "store", tmp_path / "server.log", "--workers", "1") as served,
        EncryptedClient(served.url, tmp_path / "keys") as client,
    ):
        predicted = client.predict(rows).predicted
        if kind == "ridge":  # a regressor's owner files through the CLI too: rows without the label, as parquet
            rows.drop(columns=["days"]).to_parquet(tmp_path / "rows.parquet")
            done = cli("predict", str(tmp_path / "rows.parquet"), "--server", served.url, "--key-dir",
                       str(tmp_path / "cli-keys"), "--json")  # fmt: skip
            assert done.returncode == 0, done.stderr
            np.testing.assert_allclose([a["value"] for a in json.loads(done.stdout)], simulated, rtol=1e-9)
    if schema.label.classes:
        assert predicted.tolist() == simulated.tolist()
    else:
        np.testing.assert_allclose(predicted, simulated, rtol=1e-9)
    if kind == "ridge":
        assert (
            result.model.metadata["training"]["clients"] == 2
            and result.model.metadata["metrics"]["final"]["score"] > 0.8
        )
        metrics = json.loads((tmp_path / "owners" / "report.json").read_text())["metrics"]
        assert set(metrics) == {"mae", "rmse", "r2"} and (tmp_path / "owners" / "residuals.png").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("empty", "empty owner file (a header and no rows)"),
        ("extra", "owners with different columns: it has 'note'"),
        ("lacking", "owners with different columns: it lacks 'bmi'"),
        ("nothing", "no owner files (.csv, .xlsx, .parquet, .npz)"),
        ("clients", "holds 3 owner files, each one client: --clients 5 does not match"),
        ("no-test", "--owners and --test go together"),
        ("both", "--data or --owners, not both"),
        ("dirichlet", "--partitioning dirichlet does not apply"),
        ("absent-class", "class 'readmitted' of the schema has no training rows"),
        ("stray", "notes.txt: not a table (.csv, .xlsx, .parquet, .npz)"),
        ("test-inside", "the test file is one of the owners' files"),
        ("test-copy", "150 of its 150 rows are also in the owners' files (rows equal to a test row: copy.npz 150)"),
    ],
)
def test_bad_owner_folders_are_one_line_and_write_nothing(hospitals, tmp_path, change, message):
    owners, test, schema = hospitals
    folder = tmp_path / "owners"
    folder.mkdir()
    for path in owners.iterdir():
        (folder / path.name).write_text(path.read_text())
    first = folder / "hospital-a.csv"
    frame = pd.read_csv(first)
    extra: list[str] = []
    if change == "empty":
        first.write_text(first.read_text().splitlines()[0] + "\n")
    elif change == "extra":
        frame.assign(note="x").to_csv(folder / "hospital-b.csv", index=False)
    elif change == "lacking":
        frame.drop(columns=["bmi"]).to_csv(folder / "hospital-b.csv", index=False)
    elif change == "nothing":
        for path in folder.iterdir():
            path.unlink()
    elif change == "absent-class":
        for path in folder.iterdir():
            pd.read_csv(path).assign(outcome="discharged").to_csv(path, index=False)
    elif change == "stray":
        (folder / "notes.txt").write_text("not a table")
    elif change == "test-inside":
        test = folder / "hospital-c.csv"
    elif change == "test-copy":  # another format, columns in another order: the same rows to the model
        copy = pd.read_csv(test)
        np.savez(folder / "copy.npz", **{c: copy[c].to_numpy(dtype=str if copy[c].dtype == object else float)
                                         for c in reversed(copy.columns)})  # fmt: skip
    extra = {"clients": ["--clients", "5"], "both": ["--data", str(test)], "dirichlet": ["--partitioning", "dirichlet"]
             }.get(change, [])  # fmt: skip
    given = [] if change == "no-test" else ["--test", str(test)]
    out = tmp_path / "run"
    done = cli("train", "--owners", str(folder), *given, "--schema", str(schema), *extra, "--out", str(out))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_the_deployment_engine_trains_on_the_owners_own_files(owners_run, hospitals, tmp_path):
    shared, test, schema = hospitals
    owners = Path(shutil.copytree(shared, tmp_path / "owners"))  # one of its files is moved away below
    out, low = tmp_path / "deployed", free_port()
    ports = range(low, low + 20)
    done = cli("federation", "up", "--owners", str(owners), "--test", str(test), "--schema", str(schema),
               "--rounds", "3", "--class-weight", "balanced", "--ports", f"{low}-{low + 19}", "--compile",
               "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    address = (out / "federation" / "flwr-home" / "config.toml").read_text().split('address = "127.0.0.1:')[1]
    listening = [int(address.split('"')[0])]  # the SuperLink's, then each SuperNode's Runtime API
    for i in range(3):
        log = (out / "federation" / "logs" / f"supernode-{i}.log").read_text()
        listening.append(int(log.split("Uvicorn running on http://127.0.0.1:")[1].split()[0]))
    assert len(set(listening)) == 4 and all(port in ports for port in listening), listening
    assert list((out / "federation" / "data").iterdir()) == []  # no copies: each SuperNode read its CSV
    model, simulated = LinearModel.load(out / "model.npz"), LinearModel.load(owners_run / "model.npz")
    assert model.metadata["training"]["clients"] == 3 and model.metadata["schema"] == simulated.metadata["schema"]
    assert model.metadata["n_train"] == 600  # the server holds only the test file: the nodes reported their rows
    assert model.sha256 == simulated.sha256  # the simulation's model, bit for bit, as for bundled sets
    assert model.metadata["observed_range"] == simulated.metadata["observed_range"]  # each SuperNode read its file
    filled = {f"owner {i}": {"bmi": 4} for i in range(3)}  # each SuperNode counted its own gaps
    assert model.metadata["filled"] == {**filled, "test.csv (test)": {"bmi": 3}}
    assert model.metadata["leakage"] == simulated.metadata["leakage"]  # counted here, recorded by the ServerApp
    counts = json.loads((out / "metrics.json").read_text())["class_counts"]  # the nodes counted their own rows
    assert counts == json.loads((owners_run / "metrics.json").read_text())["class_counts"] and sum(counts) == 600
    assert json.loads((out / "report.json").read_text())["agreement"]["fhe_vs_clear"] == 1.0  # --compile evaluated
    assert "report: " in done.stderr and "next:" not in done.stderr
    (owners / "hospital-a.csv").rename(tmp_path / "away.csv")  # evaluating and tuning need only the test file
    try:
        tuned = cli("tune", "--run", str(out), "--n-bits", "6,8", "--latency-samples", "1", "--no-bit-pairs")
    finally:
        (tmp_path / "away.csv").rename(owners / "hospital-a.csv")
    assert tuned.returncode == 0, tuned.stderr


def test_owners_may_differ_in_ignored_columns_and_numbers_match_their_classes(tmp_path):
    (tmp_path / "owners").mkdir()
    (tmp_path / "owners" / "a.csv").write_text("id,dose,site,cured\nx1,1.5,1,1.0\nx2,2.5,2,0.0\n")
    (tmp_path / "owners" / "b.CSV").write_text("dose,site,cured\n3.0,,1\n0.5,3,0\n")  # no id; a blank site
    (tmp_path / "test.csv").write_text("dose,site,cured\n1.0,2,0\n2.0,1,1\n")
    draft = drafting.infer({"a.csv": table.read_frame(tmp_path / "owners" / "a.csv")}, "cured", ignore=("id",)).schema
    assert draft.label.classes == (0.0, 1.0) and draft.ignore == ("id",)
    schema = table.Schema.from_dict(
        {**draft.to_dict(), "features": [{"name": "dose", "low": 0, "high": 5},
                                         {"name": "site", "categories": [1, 2, 3], "missing": 1}]}
    )  # fmt: skip
    data = table.load_owners(tmp_path / "owners", tmp_path / "test.csv", schema)
    assert data.owners == (2, 2) and data.y_train.tolist() == [1, 0, 1, 0]  # 1.0 and 1 are the class 1.0
    assert data.X_train[2].tolist() == [3.0, 1.0, 0.0, 0.0]  # the blank site took the declared 1


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> list[str]:
    """The command lines of a README block between its markers, comments dropped."""
    begin, end = f"<!-- {name}: tests/test_owners.py runs these lines as written -->", f"<!-- {name}: end -->"
    block = README.read_text().split(begin)[1].split(end)[0].split("```bash\n")[1].split("```")[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def run_block(lines: list[str], folder: Path) -> str:
    """README lines in one bash from `folder`, the server line's port made free and waited for; stdout."""
    from fedfhe.federated.deployment import BIN, free_port

    port = str(free_port())  # the README's 8000 may be taken here
    health = f"import httpx; httpx.get('http://127.0.0.1:{port}/v1/health').raise_for_status()"
    wait = f'for i in $(seq 300); do {sys.executable} -c "{health}" 2>/dev/null && break; sleep 0.3; done'
    script = ["set -e", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT"]
    for line in lines:
        script += [line.replace("8000", port)] + ([wait] if line.startswith("fedfhe serve") else [])
    env = {**ENV, "PATH": f"{BIN}{os.pathsep}{ENV['PATH']}", "FEDFHE_CACHE": str(folder / "cache")}
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_the_readmes_quick_start_runs_as_written(tmp_path):
    out = run_block(readme_block("quick-start"), tmp_path)
    assert "classified under encryption" in out and ("malignant" in out or "benign" in out)
    report = json.loads((tmp_path / "runs" / "bc" / "report.json").read_text())
    assert report["metrics"]["positive_class"] == "malignant" and (tmp_path / "runs" / "bc" / "card.md").is_file()


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_the_readmes_own_data_walkthrough_runs_as_written(tmp_path):
    (tmp_path / "hospitals").mkdir()
    export_a(tmp_path / "hospitals" / "a.csv")
    export_b(tmp_path / "hospitals" / "b.csv", sep_line=True)
    export_c(tmp_path / "hospitals" / "c.parquet")
    admissions(150, 7).to_csv(tmp_path / "test.csv", index=False)  # seed 7: no test row equals an owner's
    lab = admissions(30, 11).drop(columns=["readmitted_30d"])
    lab.loc[4, "prior_admissions"] = 14  # agreed (0-20), never seen in training (0-5)
    lab.loc[[9, 21], "prior_admissions"], lab.loc[16, "age"] = [25, 31], 130  # outside the agreed ranges
    lab.loc[[7, 12], "hba1c"] = "?"
    lab.to_csv(tmp_path / "lab.csv", index=False)
    agreed = README.read_text().split("<!-- own-data schema: tests/test_owners.py writes this as schema.json -->")[1]
    (tmp_path / "schema.json").write_text(agreed.split("```json\n")[1].split("```")[0])
    run_block(readme_block("own-data"), tmp_path)
    draft, schema = (table.Schema.load(tmp_path / name) for name in ("draft.json", "schema.json"))
    assert draft.ignore == schema.ignore == ("patient_id", "admission_date") and draft.label == schema.label
    rejects = pd.read_csv(tmp_path / "rejects.csv", dtype={"patient_id": str})
    assert rejects[["row", "column", "value"]].values.tolist() == [
        [10, "prior_admissions", 25], [17, "age", 130], [22, "prior_admissions", 31]]  # fmt: skip
    assert rejects["patient_id"].tolist() == lab["patient_id"][[9, 16, 21]].tolist()
    assert rejects["reason"][0] == "25 is outside its declared range [0, 20]"
    answers = pd.read_csv(tmp_path / "predictions.csv", dtype={"patient_id": str}, keep_default_na=False)
    valid = [i for i in range(30) if i not in (9, 16, 21)]
    assert answers["row"].tolist() == [i + 1 for i in valid]  # the lab's own row numbers, from 1
    assert answers["patient_id"].tolist() == lab["patient_id"][valid].tolist()  # --keep: copied, never sent
    notes = answers.set_index("row")[["filled", "outside_observed"]]
    assert notes.loc[5, "outside_observed"] == "prior_admissions" and (notes["outside_observed"] != "").sum() == 1
    assert notes.loc[[8, 13], "filled"].tolist() == ["hba1c", "hba1c"] and (notes["filled"] != "").sum() == 2
    model = LinearModel.load(tmp_path / "runs" / "h" / "model.npz")
    assert model.metadata["operating_point"]["class"] == "yes"
    filled = {"a.csv": {"hba1c": 14}, "b.csv": {"hba1c": 18}, "c.parquet": {}, "test.csv (test)": {}}
    assert model.metadata["filled"] == filled
    encoded, _ = schema.encode(table.read_frame(tmp_path / "lab.csv").iloc[valid], "lab", labelled=False)
    simulated = load_compiled(tmp_path / "runs" / "h", model).predict(encoded, fhe="simulate")
    assert answers["class"].tolist() == [schema.label.classes[int(c)] for c in simulated]


@pytest.mark.federation
@pytest.mark.server
@pytest.mark.fhe
def test_the_readmes_cheat_sheet_runs_as_written(hospitals, tmp_path):
    from fedfhe.data import load_dataset

    split = load_dataset("breast-cancer", seed=1)  # rows the partner holds: any from the same population
    header = ",".join(f"f{i}" for i in range(split.X_test.shape[1]))
    labelled = np.column_stack([split.X_test[:30], split.y_test[:30]])
    np.savetxt(tmp_path / "partner.csv", labelled, delimiter=",", header=header + ",label", comments="")
    np.savetxt(tmp_path / "rows.csv", split.X_test[:2], delimiter=",", header=header, comments="")
    shutil.copy(hospitals[0] / "hospital-a.csv", tmp_path / "mine.csv")
    answers = json.loads(run_block(readme_block("cheat-sheet"), tmp_path).strip().splitlines()[-1])
    assert [a["row"] for a in answers] == [1, 2] and {a["name"] for a in answers} <= {"malignant", "benign"}
    runs = tmp_path / "runs"
    evaluated = json.loads((runs / "a" / "evaluations" / "partner.csv" / "report.json").read_text())
    assert evaluated["n_test"] == evaluated["fhe_samples"] == 30  # by default 100 rows in real FHE, or all of fewer
    assert evaluated["agreement"]["fhe_vs_clear"] == evaluated["agreement"]["execute_vs_clear"] == 1.0
    tuned = json.loads((runs / "a" / "tune.json").read_text())
    widths = [p["n_bits"] for p in tuned["points"]]
    assert widths[:3] == [4, 6, 8] and any(isinstance(n_bits, dict) for n_bits in widths[3:])  # then inputs/weights
    assert (tuned["metric"]["name"], tuned["metric"]["positive_class"]) == ("pr-auc", "malignant")
    assert "I/W bits: inputs quantized to I bits" in (runs / "a" / "tune.md").read_text()
    assert (runs / "a" / "card.md").is_file() and (runs / "r" / "model.npz").is_file()
    assert LinearModel.load(runs / "f" / "model.npz").metadata["training"]["clients"] == 3
    assert table.Schema.load(tmp_path / "schema.json").label.name == "outcome"
