"""Real exports read as they are: dialects, missing-value tokens, aliases; every bad row listed at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli

from fedfhe import table
from fedfhe.errors import FedfheError
from fedfhe.reading import Dialect

COLUMNS = ["patient_id", "admission_date", "age", "sex", "hba1c", "prior_admissions", "readmitted_30d"]


def admissions(rows: int, seed: int) -> pd.DataFrame:
    """Admissions as a hospital system holds them: an id, a date, numbers, a sex, a lab value often missing."""
    rng = np.random.default_rng(seed)
    age = rng.integers(20, 90, rows)
    prior = rng.integers(0, 6, rows)
    hba1c = rng.uniform(4.5, 11.0, rows).round(1)
    sex = rng.choice(["F", "M"], rows)
    risk = (age - 60) / 12 + (hba1c - 7) / 1.2 + prior * 0.4 + rng.normal(0, 0.6, rows)
    dates = pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 300, rows), unit="D")
    return pd.DataFrame(
        {
            "patient_id": [f"{seed}-{i:05d}" for i in range(rows)],
            "admission_date": dates.strftime("%Y-%m-%d"),
            "age": age,
            "sex": sex,
            "hba1c": hba1c.astype(object),
            "prior_admissions": prior,
            "readmitted_30d": np.where(risk > 2.5, "yes", "no"),  # about a third readmitted: the rarer class
        }
    )


def export_a(path: Path, rows: int = 120, seed: int = 1) -> Path:
    """Hospital A: a plain CSV, `?` for a missing HbA1c."""
    frame = admissions(rows, seed)
    frame.loc[frame.index % 9 == 0, "hba1c"] = "?"
    frame.to_csv(path, index=False)
    return path


def export_b(path: Path, rows: int = 120, seed: int = 2, sep_line: bool = False) -> Path:
    """Hospital B: Excel in a European locale: `;`, decimal commas, a UTF-8 BOM, CRLF, `NA`, labels Yes/yes /no ."""
    frame = admissions(rows, seed)
    frame["hba1c"] = [str(v).replace(".", ",") for v in frame["hba1c"]]
    frame.loc[frame.index % 7 == 0, "hba1c"] = "NA"
    spelled = {"yes": ["Yes", "yes "], "no": ["no ", "no"]}
    frame["readmitted_30d"] = [spelled[v][i % 2] for i, v in enumerate(frame["readmitted_30d"])]
    text = frame.to_csv(index=False, sep=";", lineterminator="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + (("sep=;\r\n" if sep_line else "") + text).encode())
    return path


def export_c(path: Path, rows: int = 120, seed: int = 3) -> Path:
    """Hospital C: Parquet, sex written male/female."""
    frame = admissions(rows, seed)
    frame["sex"] = frame["sex"].map({"F": "female", "M": "male"})
    frame["hba1c"] = frame["hba1c"].astype(float)
    frame.to_parquet(path, index=False)
    return path


SCHEMA = {
    "features": [
        {"name": "age", "low": 0, "high": 110},
        {"name": "sex", "categories": ["F", "M"], "aliases": {"female": "F", "male": "M"}},
        {"name": "hba1c", "low": 3, "high": 15, "missing": "indicator"},
        {"name": "prior_admissions", "low": 0, "high": 20},
    ],
    "label": {
        "name": "readmitted_30d",
        "classes": ["no", "yes"],
        "positive": "yes",
        "aliases": {"Yes": "yes", "yes ": "yes", "no ": "no"},
    },
    "ignore": ["patient_id", "admission_date"],
}


def test_a_european_excel_csv_is_read_as_the_plain_one(tmp_path):
    schema = table.Schema.from_dict(SCHEMA)
    for sep_line in (False, True):
        frame = table.read_frame(export_b(tmp_path / "b.csv", sep_line=sep_line))
        assert frame.attrs["read_as"].startswith("separator ';', decimal ',', UTF-8 with a BOM")
        assert ("Excel 'sep=;' line" in frame.attrs["read_as"]) == sep_line
        assert frame["hba1c"].dtype == np.float64 and frame["hba1c"].isna().sum() == 18  # every 7th: NA
        rows = schema.rows(frame, "b.csv")
        assert not rows.problems and rows.filled_counts(schema) == {"hba1c": 18}
    plain = admissions(120, 2)
    np.testing.assert_allclose(rows.X[:, 3][rows.filled[:, 2] == 0], plain["hba1c"][plain.index % 7 != 0].astype(float))
    assert rows.X[:, 4].sum() == 18  # the indicator input: 1 where HbA1c was missing
    assert rows.y.tolist() == (plain["readmitted_30d"] == "yes").astype(int).tolist()  # Yes, "yes ", "no " mapped
    cp1252 = tmp_path / "cp1252.csv"
    cp1252.write_bytes("age;sex;hba1c;prior_admissions;readmitted_30d;patient_id;admission_date\n"
                       "50;F;6,5;1;no;Müller;2026-01-02\n61;M;7,1;0;yes;Ærø;2026-01-03\n".encode("cp1252"))  # fmt: skip
    frame = table.read_frame(cp1252)
    assert "cp1252 (not UTF-8)" in frame.attrs["read_as"] and frame["patient_id"].tolist() == ["Müller", "Ærø"]
    assert schema.rows(frame, "cp1252.csv").X[:, 3].tolist() == [6.5, 7.1]


def test_the_three_exports_encode_alike_and_xlsx_reads_as_csv(tmp_path):
    schema = table.Schema.from_dict(SCHEMA)
    a = schema.rows(table.read_frame(export_a(tmp_path / "a.csv")), "a")
    c = schema.rows(table.read_frame(export_c(tmp_path / "c.parquet")), "c")
    assert not a.problems and not c.problems
    assert a.filled_counts(schema) == {"hba1c": 14} and c.filled_counts(schema) == {}  # `?` is a default token
    truth = admissions(120, 3)
    assert c.X[:, 1].tolist() == (truth["sex"] == "F").astype(float).tolist()  # female -> F through the alias
    admissions(50, 4).to_excel(tmp_path / "d.xlsx", index=False)
    admissions(50, 4).to_csv(tmp_path / "d.csv", index=False)
    from_xlsx, from_csv = (schema.rows(table.read_frame(tmp_path / f"d.{k}"), k) for k in ("xlsx", "csv"))
    np.testing.assert_array_equal(from_xlsx.X, from_csv.X)
    assert table.read_frame(tmp_path / "d.xlsx").attrs["read_as"] == "sheet 'Sheet1'"


def test_missing_value_tokens_and_what_each_feature_does_with_them_are_declared(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("age,sex,hba1c,prior_admissions,readmitted_30d\n50,F,-,1,no\n61,M,,0,yes\n70,F,6.1,2,no\n")
    refuse = {**SCHEMA, "ignore": [], "features": [*SCHEMA["features"][:2], {"name": "hba1c", "low": 3, "high": 15},
                                                   SCHEMA["features"][3]]}  # fmt: skip
    with pytest.raises(FedfheError, match=r"2 of 3 row\(s\) refused; first row 1, column 'hba1c': '-' is not a fin"):
        table.Schema.from_dict(refuse).encode(table.read_frame(path), "a.csv")
    dashed = table.Schema.from_dict({**refuse, "missing_values": ["", "-"]})
    with pytest.raises(FedfheError, match="row 1, column 'hba1c': missing value"):
        dashed.encode(table.read_frame(path, dialect=dashed.dialect), "a.csv")
    filled = table.Schema.from_dict({**refuse, "missing_values": ["", "-"], "features": [
        *SCHEMA["features"][:2], {"name": "hba1c", "low": 3, "high": 15, "missing": 6.5}, SCHEMA["features"][3]]})  # fmt: skip
    rows = filled.rows(table.read_frame(path, dialect=filled.dialect), "a.csv")
    assert rows.X[:, 3].tolist() == [6.5, 6.5, 6.1] and rows.filled_counts(filled) == {"hba1c": 2}
    assert filled.encoded_names == ["age", "sex=F", "sex=M", "hba1c", "prior_admissions"]
    indicator = table.Schema.from_dict(SCHEMA)
    assert indicator.encoded_names == ["age", "sex=F", "sex=M", "hba1c", "hba1c (missing)", "prior_admissions"]
    assert indicator.input_range[0].tolist() == [0, 0, 0, 3, 0, 0]
    assert table.Schema.from_dict(json.loads(json.dumps(filled.to_dict()))) == filled  # tokens survive the JSON


@pytest.mark.parametrize(
    "change, message",
    [
        ({"missing_values": "?"}, '"missing_values" must be a list of texts'),
        ({"format": {"sep": ":"}}, "separator ':' is not one of"),
        ({"format": {"sep": ",", "decimal": ","}}, "the separator and the decimal mark are both ','"),
        ({"format": {"encoding": "klingon"}}, "unknown text encoding 'klingon'"),
        ({"format": {"quote": "'"}}, '"format" must be an object with "sep", "decimal" and/or "encoding"'),
        ({"features": [{"name": "sex", "categories": ["F", "M"], "aliases": {"male": "Male"}}]},
         "feature 'sex': alias target 'Male' is not one of \\['F', 'M'\\]"),
        ({"features": [{"name": "sex", "categories": ["F", "M"], "aliases": {"M": "F"}}]},
         "feature 'sex': 'M' is one of its values and cannot also be an alias"),
        ({"features": [{"name": "age", "low": 0, "high": 1, "aliases": {"a": "b"}}]}, "a number feature has none"),
        ({"features": [{"name": "age", "low": 0, "high": 1, "missing": "mean"}]},
         'missing value \'mean\' must be a number within \\[0.0, 1.0\\] or "indicator"'),
        ({"features": [{"name": "sex", "categories": ["F", "M"], "missing": "X"}]}, "must be one of its categories"),
    ],
)  # fmt: skip
def test_bad_formats_tokens_and_aliases_are_one_line(change, message):
    with pytest.raises(FedfheError, match=message):
        table.Schema.from_dict({**SCHEMA, **change})


def test_every_bad_row_is_listed_at_once_with_its_file_row_and_column(tmp_path):
    path = tmp_path / "lab.csv"
    frame = admissions(30, 5).drop(columns=["readmitted_30d"])
    frame.loc[[3, 11], "prior_admissions"] = [25, 40]
    frame.loc[17, "sex"] = "x"
    frame.to_csv(path, index=False)
    with pytest.raises(table.InvalidRows) as refused:
        table.Schema.from_dict(SCHEMA).encode(table.read_frame(path), str(path), labelled=False)
    assert str(refused.value).startswith(f"{path}: 3 of 30 row(s) refused; first row 4, column 'prior_admissions'")
    assert [str(p) for p in refused.value.problems] == [
        "row 4, column 'prior_admissions': 25 is outside its declared range [0, 20]",
        "row 12, column 'prior_admissions': 40 is outside its declared range [0, 20]",
        "row 18, column 'sex': 'x' is not one of its categories ['F', 'M', \"or an alias 'female'\", \"or an alias 'male'\"]",
    ]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    labelled = tmp_path / "labelled.csv"
    admissions(30, 5).assign(age=lambda f: f["age"] + 200 * (f.index % 10 == 0)).to_csv(labelled, index=False)
    done = cli("schema", "check", str(labelled), "--schema", str(schema))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 4 and lines[0].startswith(f"{labelled}, row 1, column 'age': 2")
    assert lines[-1].startswith(f"error: {labelled}: 3 of 30 row(s) refused; first row 1"), done.stderr
    done = cli("schema", "check", str(export_b(tmp_path / "b.csv")), "--schema", str(schema))
    assert done.returncode == 0, done.stderr
    assert "missing cells filled as the schema declares: hba1c: 18 (read with separator ';', decimal ','" in done.stderr


def test_an_ambiguous_file_is_refused_and_a_declared_dialect_reads_it(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("a;b,c\n1;2,3\n4;5,6\n")
    with pytest.raises(FedfheError, match="cannot tell the separator \\(',' and ';' both split every line alike\\)"):
        table.read_frame(path)
    assert table.read_frame(path, dialect=Dialect(sep=";", decimal=",")).columns.tolist() == ["a", "b,c"]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("a;b\n1,5;2\n2.5;3\n")
    with pytest.raises(FedfheError, match="cannot tell the decimal mark \\(cells '2.5' and '1,5'\\): give --decimal"):
        table.read_frame(mixed)
    assert table.read_frame(mixed, dialect=Dialect(decimal=",")).to_dict("list") == {"a": [1.5, "2.5"], "b": [2, 3]}


def test_schema_infer_drafts_one_schema_from_every_owners_export_with_a_line_per_decision(tmp_path):
    owners = tmp_path / "owners"
    owners.mkdir()
    files = [export_a(owners / "a.csv"), export_b(owners / "b.csv"), export_c(owners / "c.parquet")]
    out = tmp_path / "draft.json"
    done = cli("schema", "infer", *map(str, files), "--label", "readmitted_30d", "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    for line in [
        "warning: patient_id: ignored: an identifier (360 distinct values in 360 cells); --keep patient_id to keep it",
        ("warning: admission_date: ignored: dates (e.g. '2026-05-29'; a number derived from them, such as days since "
         "an event, may do); --keep admission_date to keep it"),
        "sex: 4 categories: 'F', 'M', 'female', 'male'",
        ("warning: sex: 'female', 'male' only in c.parquet; 'F', 'M' only in a.csv, b.csv: if some mean the same, "
         'keep one under "categories" and map the others onto it with "aliases"'),
        ('warning: hba1c: missing cells (14 in a.csv, 18 in b.csv, 0 in c.parquet) are refused until its entry says '
         '"missing": a number to fill them with, or "indicator" (an extra 0/1 input marks them)'),
        "readmitted_30d: the label, 2 classes: 'no', 'yes'",
        ("warning: readmitted_30d: \"aliases\" map 'no ' onto 'no' and 'Yes', 'yes ' onto 'yes' (they differ only "
         "by case or spaces around)"),
    ]:  # fmt: skip
        assert line in lines, done.stderr
    assert "positive class proposed: 'yes', the rarer of the two in a.csv, b.csv, c.parquet" in done.stderr
    draft = json.loads(out.read_text())
    kinds = {f["name"]: f.get("categories") or (f["low"], f["high"]) for f in draft["features"]}
    assert kinds == {"age": (20, 89), "sex": ["F", "M", "female", "male"], "hba1c": (4.5, 11), "prior_admissions":
                     (0, 5)} and all("missing" not in f for f in draft["features"])  # fmt: skip
    assert draft["ignore"] == ["patient_id", "admission_date"]
    assert draft["label"] == {**SCHEMA["label"], "name": "readmitted_30d"}  # classes no, yes; Yes, "yes ", "no " mapped
    folder = cli("schema", "infer", str(owners), "--label", "readmitted_30d")  # a folder: its tables, by name
    assert folder.returncode == 0 and json.loads(folder.stdout) == draft, folder.stderr
    features = {f["name"]: f for f in draft["features"]}
    features["sex"] = {"name": "sex", "categories": ["F", "M"], "aliases": {"female": "F", "male": "M"}}
    features["hba1c"]["missing"] = "indicator"
    (tmp_path / "schema.json").write_text(json.dumps({**draft, "features": list(features.values())}))
    for path in files:
        checked = cli("schema", "check", str(path), "--schema", str(tmp_path / "schema.json"))
        assert checked.returncode == 0, checked.stderr


def test_a_draft_flags_odd_numbers_spellings_and_free_text_and_keeps_what_it_is_told(tmp_path):
    from fedfhe import drafting

    frame = admissions(60, 6)
    frame["hba1c"] = frame["hba1c"].astype(str)
    frame.loc[[3, 9], "hba1c"], frame.loc[5, "hba1c"] = "high", ">100"
    frame["ward"] = ["cardiology", "Cardiology", "cardiology ", "cardiology", "surgery"] * 12
    frame["note"] = [f"seen on ward round {i}, " + "stable " * 20 for i in range(60)]  # long texts
    frame.to_csv(tmp_path / "d.csv", index=False)
    draft = drafting.infer({"d.csv": table.read_frame(tmp_path / "d.csv")}, "readmitted_30d", keep=("patient_id",))
    said = [n.text for n in draft.notes if n.warning]
    assert "hba1c: 3 cell(s) are not numbers (3 in d.csv): '>100', 'high'; they are refused until fixed, " \
           'or added to "missing_values" if they mean "no value"' in said  # fmt: skip
    assert "ward: \"aliases\" map 'Cardiology', 'cardiology ' onto 'cardiology' (they differ only by case or " \
           "spaces around)" in said  # fmt: skip
    assert any(t.startswith("note: ignored: free text (60 distinct values in 60 cells") for t in said), said
    features = {f.name: f for f in draft.schema.features}
    assert not features["hba1c"].categories and features["hba1c"].high == 11  # a number, its odd cells flagged
    assert features["ward"].categories == ("cardiology", "surgery")
    assert len(features["patient_id"].categories) == 60 and draft.schema.ignore == ("admission_date", "note")
    with pytest.raises(FedfheError, match="'note' is given to both --ignore and --keep"):
        drafting.infer({"d.csv": frame}, "readmitted_30d", ignore=("note",), keep=("note",))
    with pytest.raises(FedfheError, match="e.csv: no column 'readmitted_30d' to use as the label"):
        drafting.infer({"d.csv": frame, "e.csv": frame.drop(columns="readmitted_30d")}, "readmitted_30d")


def test_a_column_the_models_schema_lacks_is_to_be_dropped_not_ignored(tmp_path):
    frame = admissions(5, 6).assign(ward="a")
    schema = table.Schema.from_dict(SCHEMA)
    with pytest.raises(FedfheError, match=r"column 'ward' is not in the schema \(list it under \"ignore\""):
        schema.rows(frame, "own.csv")
    with pytest.raises(FedfheError, match="column 'ward' is not in the schema \\(the model's schema is fixed: drop"):
        schema.rows(frame.drop(columns=["readmitted_30d"]), "lab.csv", labelled=False, pinned=True)
