"""A data owner's own table and its schema: drafted from the owner's file, checked, encoded; every bad input one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli

from fedfhe import TrainConfig, drafting, pipeline, result, table, train
from fedfhe.errors import FedfheError
from fedfhe.federated.server_app import _server_data
from fedfhe.model import MAX_HEADER, LinearModel
from fedfhe.problem import shared_range

CSV = """patient,age,ward,bmi,outcome
p1,34,cardiology,22.5,discharged
p2,71,oncology,31.0,readmitted
p3,55,cardiology,,discharged
p4,18,surgery,19.2,discharged
"""


@pytest.fixture
def owner(tmp_path):
    """A hospital's table as it would hold it: a header, an identifier, a text category, text labels, a gap."""
    path = tmp_path / "hospital-a.csv"
    path.write_text(CSV)
    return path


def schema_file(tmp_path, **changes) -> str:
    """The schema the hospitals agreed on, with changes; its path."""
    schema = {
        "features": [
            {"name": "age", "low": 0, "high": 120},
            {"name": "ward", "categories": ["cardiology", "oncology", "surgery"]},
            {"name": "bmi", "low": 10, "high": 60, "missing": 25},
        ],
        "label": {"name": "outcome", "classes": ["discharged", "readmitted"], "positive": "readmitted"},
        "ignore": ["patient"],
    }
    schema.update(changes)
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    return str(path)


def test_a_table_is_encoded_by_name_with_one_hot_categories(owner, tmp_path):
    schema = table.Schema.load(schema_file(tmp_path))
    X, y = schema.encode(table.read_frame(owner), str(owner))
    assert schema.encoded_names == ["age", "ward=cardiology", "ward=oncology", "ward=surgery", "bmi"]
    assert X.tolist()[2] == [55, 1, 0, 0, 25]  # the gap takes the declared missing value
    assert y.tolist() == [0, 1, 0, 0]
    low, high = schema.input_range
    assert low.tolist() == [0, 0, 0, 0, 10] and high.tolist() == [120, 1, 1, 1, 60]
    shuffled = tmp_path / "shuffled.csv"  # columns in any order
    table.read_frame(owner)[["outcome", "bmi", "patient", "ward", "age"]].to_csv(shuffled, index=False)
    again, _ = schema.encode(table.read_frame(shuffled), "shuffled")
    assert np.array_equal(X, again)


def test_parquet_and_npz_tables_read_as_the_csv(owner, tmp_path):
    frame = table.read_frame(owner)
    frame.to_parquet(tmp_path / "t.parquet")
    np.savez(
        tmp_path / "t.npz", **{c: frame[c].to_numpy(dtype=str if frame[c].dtype == object else float) for c in frame}
    )
    schema = table.Schema.load(schema_file(tmp_path))
    X, y = schema.encode(frame, "csv")
    for name in ("t.parquet", "t.npz"):
        X2, y2 = schema.encode(table.read_frame(tmp_path / name), name)
        assert np.array_equal(X, X2) and np.array_equal(y, y2)


def test_schema_infer_drafts_ranges_and_categories_from_the_owners_file(owner, tmp_path):
    out = tmp_path / "draft.json"
    done = cli("schema", "infer", str(owner), "--label", "outcome", "--out", str(out))
    assert done.returncode == 0, done.stderr
    draft = json.loads(out.read_text())
    features = {f["name"]: f for f in draft["features"]}
    assert features["age"] == {"name": "age", "low": 18.0, "high": 71.0}  # 2 significant digits, outward
    assert features["bmi"] == {"name": "bmi", "low": 19.0, "high": 31.0}
    assert features["ward"]["categories"] == ["cardiology", "oncology", "surgery"]
    assert features["patient"]["categories"] == ["p1", "p2", "p3", "p4"]  # the owner decides what to ignore
    assert draft["label"] == {"name": "outcome", "classes": ["discharged", "readmitted"], "positive": "readmitted"}
    assert "positive class proposed: 'readmitted', the rarer of the two" in " ".join(done.stderr.split())
    again = cli("schema", "infer", str(owner), "--label", "outcome", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr  # nothing saved is lost
    out.unlink()
    done = cli("schema", "infer", str(owner), "--label", "outcome", "--ignore", "patient", "--out", str(out))
    assert done.returncode == 0 and json.loads(out.read_text())["ignore"] == ["patient"], done.stderr
    assert "patient" not in {f["name"] for f in json.loads(out.read_text())["features"]}
    with pytest.raises(FedfheError, match="no column 'nurse' to ignore"):
        drafting.infer({"a": table.read_frame(owner)}, "outcome", ignore=("nurse",))
    regression = tmp_path / "stay.csv"
    regression.write_text("age,days\n30,2.5\n40,11.25\n")
    inferred = drafting.infer({"stay.csv": table.read_frame(regression)}, "days").schema
    assert inferred.label == table.Label("days", low=2.5, high=12.0)


def test_schema_check_reports_what_training_would_read(owner, tmp_path):
    done = cli("schema", "check", str(owner), "--schema", schema_file(tmp_path))
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "4 rows, 5 model inputs from 3 features; discharged: 3, readmitted: 1" in said


@pytest.mark.parametrize(
    "csv, changes, message",
    [
        (CSV.replace("patient,", "site,"), {}, "column 'site' is not in the schema"),
        (CSV.replace(",ward,", ",room,"), {"ignore": ["patient", "room"]}, "no column 'ward'"),
        (CSV.replace("patient,age,", "patient,age,age,").replace("p1,34,", "p1,34,34,").replace("p2,71,", "p2,71,71,")
         .replace("p3,55,", "p3,55,55,").replace("p4,18,", "p4,18,18,"), {}, "column 'age' appears more than once"),
        (CSV.replace("surgery", "dermatology"), {}, "row 4, column 'ward': 'dermatology' is not one of its categories"),
        (CSV.replace("p2,71", "p2,171"), {}, "row 2, column 'age': 171 is outside its declared range \\[0, 120\\]"),
        (CSV, {"features": [{"name": "age", "low": 0, "high": 120}, {"name": "ward", "categories": ["cardiology",
         "oncology", "surgery"]}, {"name": "bmi", "low": 10, "high": 60}]}, "row 3, column 'bmi': missing value"),
        (CSV.replace("readmitted", "deceased"), {}, "row 2, column 'outcome': 'deceased' is not one of the classes"),
        (CSV.replace("p1,34", "p1,old"), {}, "row 1, column 'age': 'old' is not a finite number"),
        ("patient,age,ward,bmi,outcome\n", {}, "no rows"),
    ],
)  # fmt: skip
def test_bad_tables_are_one_line(tmp_path, csv, changes, message):
    path = tmp_path / "bad.csv"
    path.write_text(csv)
    with pytest.raises(FedfheError, match=message):
        table.Schema.load(schema_file(tmp_path, **changes)).encode(table.read_frame(path), str(path))
    done = cli("schema", "check", str(path), "--schema", schema_file(tmp_path, **changes))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"features": [{"name": "a", "low": 0, "high": 1}]}), 'needs "label"'),
        (json.dumps({"features": [], "label": {"name": "y", "classes": [0, 1]}}), 'needs "features"'),
        (json.dumps({"features": [{"name": "a", "low": 1, "high": 0}], "label": {"name": "y", "classes": [0, 1]}}),
         "low 1 must be below high 0"),
        (json.dumps({"features": [{"name": "a"}], "label": {"name": "y", "classes": [0, 1]}}), 'needs "low" and "high"'),
        (json.dumps({"features": [{"name": "y", "low": 0, "high": 1}], "label": {"name": "y", "classes": [0, 1]}}),
         "column 'y' is named more than once"),
        (json.dumps({"features": [{"name": "a", "low": 0, "high": 1}], "label": {"name": "y", "classes": [1]}}),
         "at least 2 distinct"),
        (json.dumps({"features": [{"name": "a", "low": 0, "high": 1}], "label": {"name": "y", "classes": ["n", "y"], "positive": "Y"}}),
         r"label 'y': positive 'Y' must be one of its two classes \['n', 'y'\]"),
        (json.dumps({"features": [{"name": "a", "low": 0, "high": 1}], "label": {"name": "y", "classes": [0, 1, 2], "positive": 2}}),
         "positive 2 must be one of its two classes"),
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deep to read"),
        (json.dumps({"features": [{"name": "a", "categories": ["x", "x\u0000"]}], "label": {"name": "y", "classes": [0, 1]}}),
         "feature 'a': a category contains a NUL character"),
        (json.dumps({"features": [{"name": "a", "low": 0, "high": 1}], "label": {"name": "y", "classes": ["n", "y\u0000"]}}),
         "label 'y': a class contains a NUL character"),
        (json.dumps({"features": [{"name": "a", "low": 0, "high": 1}], "label": {"name": "y" * 1001, "classes": [0, 1]}}),
         "the label's name has 1,001 characters"),
        (json.dumps({"features": [{"name": "a", "low": 0, "high": 1}], "label": {"name": "y", "classes": [0, 1]}, "ignore": ["i" * 1001]}),
         "a column to ignore has 1,001 characters"),
        ('{"features": [{"name": "a", "low": 0, "high": 1}], "label": {"name": "y", "classes": [0, ' + "1" * 5000 + "]}}",
         "not valid JSON \\(Exceeds the limit \\(4300 digits\\)"),
        (json.dumps({"features": [{"name": "a", "categories": [f"{i:03}" + "\u20ac" * 997 for i in range(100)]}],
                     "label": {"name": "y", "classes": [0, 1]}}),
         r"its names, categories, classes and observed ranges take 1,2\d\d,\d{3} bytes in a model file, more than the 983,040"),
    ],
)  # fmt: skip
def test_bad_schemas_are_one_line(owner, tmp_path, text, message):
    path = tmp_path / "schema.json"
    path.write_text(text)
    with pytest.raises(FedfheError, match=message):
        table.Schema.load(path)
    done = cli("schema", "check", str(owner), "--schema", str(path))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_schema_of_40_000_features_is_read_in_one_pass_and_refused_as_too_large_for_a_model_file():
    features = [{"name": f"f{i}", "low": 0, "high": 1} for i in range(40_000)]
    label = {"name": "y", "classes": [0, 1]}
    with pytest.raises(FedfheError, match="column 'f7' is named more than once"):  # a count per name took 17.9 s
        table.Schema.from_dict({"features": [*features, {"name": "f7", "low": 0, "high": 1}], "label": label})
    with pytest.raises(FedfheError, match=r"take 4,2\d\d,\d{3} bytes in a model file, more than the 983,040"):
        table.Schema.from_dict({"features": features, "label": label})  # 2.2 MB of names, 2.1 MB of observed ranges
    assert len(table.Schema.from_dict({"features": features[:9_000], "label": label}).encoded_names) == 9_000


def test_a_schema_at_the_model_files_limit_trains_a_model_that_loads(tmp_path):
    """The model file keeps a schema of exactly MAX_SCHEMA_BYTES (names escaped as in JSON); a byte more is refused."""
    long = [f"{i:03}" + "\u20ac" * 997 for i in range(80)]  # 1,000 characters, 6 bytes each in the header
    raw = {"features": [{"name": "ward", "categories": ["x", *long]}], "label": {"name": "y", "classes": ["a", "b"]}}
    below = table.Schema.from_dict({**raw, "description": "d"}).stored_bytes
    raw["description"] = "d" * (1 + table.MAX_SCHEMA_BYTES - below)
    schema = table.Schema.from_dict(raw)
    assert schema.stored_bytes == table.MAX_SCHEMA_BYTES
    with pytest.raises(FedfheError, match="more than the 983,040 it keeps"):
        table.Schema.from_dict({**raw, "description": raw["description"] + "d"})
    data = tmp_path / "t.csv"
    data.write_text("ward,y\n" + "x,a\nx,b\n" * 10)
    split = table.load(data, schema)
    train(split, TrainConfig(clients=1), tmp_path / "run")
    model = LinearModel.load(tmp_path / "run" / "model.npz")  # card, compile, evaluate and serve read it so
    assert model.metadata["schema"]["features"][0]["categories"][1:] == long and model.n_features == 81
    observed = model.observed_range  # the one owner's training rows, as an owner of a federation shares them
    assert observed is not None and np.array_equal(observed, shared_range(split.X_train))
    header = np.load(tmp_path / "run" / "model.npz")["header"]  # the names fill what the observed range leaves
    assert table.MAX_SCHEMA_BYTES - table.OBSERVED_BYTES * 81 < len(header) <= MAX_HEADER


def test_category_values_too_long_for_a_model_file_are_refused_before_training(tmp_path):
    """Two 600 KB category values: `run` used to train a model no command could load; now nothing is written."""
    values = ["a" * 600_000, "b" * 600_000]
    data, out = tmp_path / "t.csv", tmp_path / "run"
    data.write_text("note,y\n" + "".join(f"{v},{y}\n" for v in values for y in "nyny"))
    schema = tmp_path / "s.json"
    schema.write_text(
        json.dumps(
            {"features": [{"name": "note", "categories": values}], "label": {"name": "y", "classes": ["n", "y"]}}
        )
    )
    done = cli("run", "--data", str(data), "--schema", str(schema), "--clients", "1", "--out", str(out))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "feature 'note': a category has 600,000 characters, more than the 1,000 allowed" in done.stderr
    assert not out.exists()


def test_a_small_parquet_file_of_many_rows_is_refused_from_its_metadata(tmp_path):
    import pandas as pd

    path = tmp_path / "rows.parquet"
    pd.DataFrame({"a": np.zeros(2_000_000), "b": np.zeros(2_000_000)}).to_parquet(path)  # a few KB on disk
    assert path.stat().st_size < 1 << 20
    with pytest.raises(FedfheError, match=r"rows.parquet: 30.52 MiB declared, more than the 1 MiB allowed"):
        table.read_frame(path, max_bytes=1 << 20)
    assert len(table.read_frame(path, max_bytes=64 << 20)) == 2_000_000


def test_a_table_file_that_is_not_one_is_refused(tmp_path):
    for name, content, message in [
        ("t.xls", b"PK", "unsupported table format"),
        ("t.xlsx", b"PK", "cannot read"),
        ("t.parquet", b"not parquet", "cannot read"),
        ("missing.csv", None, "file not found"),
    ]:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(FedfheError, match=message):
            table.read_frame(path)
    frame = pd.DataFrame({"a": [1.0]})
    with pytest.raises(FedfheError, match="no column 'y' to use as the label"):
        drafting.infer({"t": frame}, "y")
    out = tmp_path / "draft.json"
    done = cli("schema", "infer", str(tmp_path / "t.parquet"), "--label", "y", "--out", str(out))
    assert done.returncode == 2 and "cannot read" in done.stderr and not out.exists()


def hospital(path, rows: int = 300, seed: int = 0, wards: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)):
    """A synthetic hospital table as an owner would hold it: readmission depends on age, ward and BMI.

    `wards` weighs the hospital's wards: owners with other weights have other readmission rates (label skew).
    """
    rng = np.random.default_rng(seed)
    age, bmi = rng.integers(18, 95, rows), rng.uniform(15, 45, rows).round(1)
    ward = rng.choice(["cardiology", "oncology", "surgery"], rows, p=wards)
    risk = (age - 55) / 15 + 2.0 * (ward == "oncology") + (bmi - 30) / 6 + rng.normal(0, 0.5, rows)
    outcome = np.where(risk > 0.5, "readmitted", "discharged")
    ids = [f"p{i}" for i in range(rows)]
    bmi = np.where(np.arange(rows) % 50 == 7, np.nan, bmi)  # a few gaps: the schema fills them with 25
    pd.DataFrame({"patient": ids, "age": age, "ward": ward, "bmi": bmi, "outcome": outcome}).to_csv(path, index=False)
    return path


@pytest.mark.federation
@pytest.mark.fhe
def test_train_compile_and_evaluate_on_your_own_table(tmp_path):
    data, out = hospital(tmp_path / "hospital.csv"), tmp_path / "run"
    schema = schema_file(tmp_path)
    done = cli("run", "--data", str(data), "--schema", schema, "--clients", "3", "--rounds", "3",
                  "--fhe-samples", "10", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "schema.json").read_text()) == json.loads(Path(schema).read_text())
    model = LinearModel.load(out / "model.npz")
    assert model.metadata["schema"]["label"]["classes"] == ["discharged", "readmitted"]
    assert model.n_features == 5 and model.input_range[1].tolist() == [120, 1, 1, 1, 60]
    assert model.metadata["metrics"]["final"]["score"] > 0.8
    report = json.loads((out / "report.json").read_text())
    agreement = dict(report["agreement"])  # FHE equals the clear quantized model; quantization may move a near-tie
    assert agreement.pop("fhe_vs_sklearn") >= 0.98 and set(agreement.values()) == {1.0}, report["agreement"]
    again = cli("evaluate", "--run", str(out), "--fhe-samples", "5")  # the run's table, read with its schema
    assert again.returncode == 0, again.stderr


STAY_SCHEMA = {
    "features": [{"name": "age", "low": 0, "high": 120}, {"name": "ward", "categories": ["a", "b"]}],
    "label": {"name": "days", "low": 0, "high": 30},
}


def stay(path, rows: int = 200, seed: int = 1):
    """A synthetic length-of-stay table: days grow with age and in ward b."""
    rng = np.random.default_rng(seed)
    age, ward = rng.integers(18, 95, rows), rng.choice(["a", "b"], rows)
    days = (age / 10 + 3 * (ward == "b") + rng.normal(0, 0.5, rows)).clip(0, 30).round(2)
    pd.DataFrame({"age": age, "ward": ward, "days": days}).to_csv(path, index=False)
    return path


@pytest.mark.federation
def test_a_regressor_on_your_own_table(tmp_path):
    schema = tmp_path / "stay.json"
    schema.write_text(json.dumps(STAY_SCHEMA))
    model = train(
        table.load(stay(tmp_path / "stay.csv"), table.Schema.load(schema)),
        TrainConfig(clients=2, rounds=2, model="ridge", params={"alpha": 0.1}),
        tmp_path / "run",
    )
    assert model.kind.name == "ridge" and model.metadata["metrics"]["final"]["score"] > 0.8  # R2


def test_two_classes_need_a_positive_one_named_by_the_schema_or_positive_class(tmp_path):
    """Never the first or last class by position: a schema naming none is refused before training."""
    data, out = hospital(tmp_path / "hospital.csv", rows=40), tmp_path / "run"
    unnamed = schema_file(tmp_path, label={"name": "outcome", "classes": ["readmitted", "discharged"]})
    done = cli("train", "--data", str(data), "--schema", unnamed, "--out", str(out))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and not out.exists(), done.stderr
    assert 'none named positive: add "positive": "readmitted" or "discharged" to its label' in done.stderr
    split = pipeline.dataset("unused", data=data, schema=unnamed, positive_class="readmitted")
    assert split.schema["label"]["positive"] == "readmitted" and result.names(split)["positive_class"] == "readmitted"
    with pytest.raises(FedfheError, match="--positive-class 'yes' is not a class; the classes are: readmitted, disch"):
        pipeline.dataset("unused", data=data, schema=unnamed, positive_class="yes")
    named = pipeline.dataset("unused", data=data, schema=schema_file(tmp_path), positive_class="discharged")
    assert result.names(named)["positive_class"] == "discharged"  # --positive-class overrides the schema
    assert result.names(pipeline.dataset("breast-cancer"))["positive_class"] == "malignant"  # bundled ones name theirs
    unnamed = schema_file(tmp_path, label={"name": "outcome", "classes": ["readmitted", "discharged"]})  # again
    done = cli("train", "--data", str(data), "--schema", unnamed, "--positive-class", "readmitted", "--clients", "1",
               "--out", str(out))  # fmt: skip
    assert done.returncode == 0 and LinearModel.load(out / "model.npz").metadata["positive_class"] == "readmitted"
    settings = {"schema": Path(unnamed).read_text(), "test-file": str(data)}  # `flwr run`: the ServerApp's data
    with pytest.raises(FedfheError, match='^run config schema: two classes and none named positive: add "positive"'):
        _server_data(settings, seed=0)


def test_data_without_its_schema_is_one_line_and_writes_nothing(tmp_path):
    data, out = hospital(tmp_path / "hospital.csv"), tmp_path / "run"
    done = cli("train", "--data", str(data), "--out", str(out))
    assert done.returncode == 2 and "--data (or --owners) and --schema go together" in done.stderr and not out.exists()
    (tmp_path / "bad.csv").write_text(CSV.replace("surgery", "dermatology"))
    done = cli("train", "--data", str(tmp_path / "bad.csv"), "--schema", schema_file(tmp_path), "--out", str(out))
    assert done.returncode == 2 and "dermatology" in done.stderr and not out.exists()


def test_train_and_run_refuse_an_owner_or_data_file_over_max_input_mb_before_reading_it(tmp_path):
    owners, out = tmp_path / "owners", tmp_path / "run"
    owners.mkdir()
    hospital(owners / "a.csv", rows=20)  # 0.6 KB, under the limit
    hospital(owners / "b.csv", rows=300, seed=1)  # 8.5 KB, over it
    test, schema = hospital(tmp_path / "test.csv", rows=20, seed=2), schema_file(tmp_path)
    for args, message in [
        (["train", "--owners", str(owners), "--test", str(test), "--max-input-mb", "0.005"],
         r"b.csv: 0.00\d+ MiB on disk, more than the 0.005 MiB allowed"),
        (["run", "--data", str(owners / "b.csv"), "--max-input-mb", "0.005"], "b.csv: 0.00"),
        (["train", "--owners", str(owners), "--test", str(test), "--max-input-mb", "0"], "--max-input-mb must be > 0"),
    ]:  # fmt: skip
        done = cli(*args, "--schema", schema, "--out", str(out))
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert re.search(message, done.stderr) and not out.exists(), done.stderr


def test_a_copy_of_the_test_file_among_the_owners_is_found_by_row_hashes_in_any_format(tmp_path):
    """Hashes of what the model reads: the copy is Parquet with its columns shuffled, and still found."""
    owners, out, schema = tmp_path / "owners", tmp_path / "run", schema_file(tmp_path)
    owners.mkdir()
    hospital(owners / "a.csv", rows=30)
    test = hospital(tmp_path / "test.csv", rows=20, seed=9)
    pd.read_csv(test)[["outcome", "bmi", "ward", "age", "patient"]].to_parquet(owners / "b.parquet")
    done = cli("train", "--owners", str(owners), "--test", str(test), "--schema", schema, "--out", str(out))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and not out.exists(), done.stderr
    assert "test.csv: 20 of its 20 rows are also in the owners' files (rows equal to a test row: b.parquet 20)" in (
        " ".join(done.stderr.split())
    )
    hashes = tmp_path / "test.hashes"  # what a coordinator shares instead of its test rows
    done = cli("schema", "hashes", str(test), "--schema", schema, "--out", str(hashes))
    lines = hashes.read_text().splitlines()
    assert done.returncode == 0 and len(lines) == 20 and lines == sorted(lines), done.stderr
    assert all(re.fullmatch("[0-9a-f]{64}", line) for line in lines)
    again = cli("schema", "hashes", str(test), "--schema", schema, "--out", str(hashes))
    assert again.returncode == 2 and "already exists" in again.stderr and hashes.read_text().splitlines() == lines
    again = cli("schema", "hashes", str(test), "--schema", schema, "--out", str(tmp_path / "test.txt"))
    assert again.returncode == 2 and "name it *.hashes" in again.stderr and not (tmp_path / "test.txt").exists()
    for against in (test, hashes):  # each owner checks its own file, against the table or its hashes
        done = cli("schema", "check", str(owners / "a.csv"), "--schema", schema, "--against", str(against))
        assert done.returncode == 0, done.stderr
        assert "0 of the 20 test rows are also training rows; 0 of the 30" in " ".join(done.stderr.split())
        done = cli("schema", "check", str(owners / "b.parquet"), "--schema", schema, "--against", str(against))
        assert done.returncode == 2 and f"{against}: 20 of its 20 rows are also in the owners' files" in done.stderr
    hashes.write_text(lines[0] + "\nnot a hash\n")
    done = cli("schema", "check", str(owners / "a.csv"), "--schema", schema, "--against", str(hashes))
    assert done.returncode == 2 and "test.hashes, line 2: not a row hash (64 lowercase hex digits)" in done.stderr


def test_allow_overlap_trains_records_the_counts_and_resumes(tmp_path):
    owners, out, schema = tmp_path / "owners", tmp_path / "run", schema_file(tmp_path)
    owners.mkdir()
    test = hospital(tmp_path / "test.csv", rows=20, seed=9)
    frame = pd.read_csv(test)
    other = pd.read_csv(hospital(tmp_path / "other.csv", rows=40, seed=1))  # no row equal to another or a test row
    pd.concat([frame, frame.head(3), other]).to_csv(owners / "a.csv", index=False)  # one owner: trained centrally
    args = ["train", "--owners", str(owners), "--test", str(test), "--schema", schema, "--allow-overlap"]
    done = cli(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    found = {
        "training_rows": 63,
        "test_rows": 20,
        "test_in_training": 20,
        "training_duplicates": 3,
        "test_duplicates": 0,
    }
    assert "warning: row hashes: 20 of the 20 test rows are also training rows" in " ".join(done.stderr.split())
    assert LinearModel.load(out / "model.npz").metadata["leakage"] == found
    assert json.loads((out / "train_config.json").read_text())["training"]["allow_overlap"] is True
    done = cli("train", "--resume", str(out))  # reads the owners' files again, as the run was allowed to
    assert done.returncode == 0, done.stderr
    settings = {"schema": Path(schema).read_text(), "test-file": str(test), "leakage": json.dumps(found)}
    assert _server_data(settings, seed=0).leakage == found  # as `federation up` hands the counts to the ServerApp
    with pytest.raises(FedfheError, match="^run config leakage: not row-hash counts"):
        _server_data({**settings, "leakage": '{"test_rows": "all"}'}, seed=0)
    data = table.load(owners / "a.csv", table.Schema.load(schema))  # one table, split: copies may land on both sides
    assert data.leakage is not None and data.leakage["training_rows"] + data.leakage["test_rows"] == 63
    repeats = data.leakage["test_in_training"] + data.leakage["training_duplicates"] + data.leakage["test_duplicates"]
    assert repeats == 3  # each of the 3 copies repeats a row on its side of the split, or has it on the other
