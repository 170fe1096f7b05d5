"""The CLI end to end (a real subprocess), and one-line errors for every bad input (in this process)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, copy_of, fedfhe


@pytest.fixture(scope="session")
def cli_run(once) -> Path:
    """`fedfhe run` in a process of its own: digits, 4 clients of a Dirichlet split, 6 bits, 3 rows in FHE."""
    return once("cli-run", _cli_run)


def _cli_run(out: Path) -> None:
    done = fedfhe(
        "run",
        "--dataset",
        "digits",
        "--clients",
        "4",
        "--rounds",
        "2",
        "--partitioning",
        "dirichlet",
        "--alpha",
        "0.3",
        "--n-bits",
        "6",
        "--fhe-samples",
        "3",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.federation
@pytest.mark.fhe
def test_run_writes_the_whole_report(cli_run):
    report = json.loads((cli_run / "report.json").read_text())
    for key in ("dataset", "n_train", "n_test", "clients", "rounds", "fhe_samples"):
        assert key in report
    assert set(report["accuracy"]) >= {"centralized", "federated", "fhe_clear", "fhe_simulate", "fhe_execute"}
    assert report["agreement"]["execute_vs_simulate"] == 1.0 and report["agreement"]["fhe_vs_clear"] == 1.0
    assert set(report["timing_s"]) >= {"train", "compile", "fhe_execute_per_sample"}
    assert report["circuit"]["max_bit_width"] > 6
    assert (report["dataset"], report["clients"], report["rounds"], report["fhe_samples"]) == ("digits", 4, 2, 3)
    assert "| fhe_simulate |" in (cli_run / "report.md").read_text()
    for name in ("confusion_matrix.png", "training.png", "partitions.png", "fhe/client.zip", "fhe/server.zip"):
        assert (cli_run / name).is_file()


@pytest.mark.federation
@pytest.mark.fhe
def test_compile_and_evaluate_again_on_user_data(cli_run, tmp_path, monkeypatch):
    from fedfhe.data import load_dataset

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # Concrete's temporary folders land here
    (tmp_path / "tmp").mkdir()
    test = load_dataset("digits", seed=0)
    np.savez(tmp_path / "mine.npz", X=test.X_test[:40], y=test.y_test[:40])
    cli_run = copy_of(cli_run, tmp_path)
    assert cli("card", "--run", str(cli_run)).returncode == 0
    before = json.loads((cli_run / "card.json").read_text())
    assert before["evaluation"] is not None and before["fhe"]["n_bits"] == 6
    assert cli("compile", "--run", str(cli_run), "--n-bits", "5").returncode == 0
    assert not (cli_run / "report.json").exists() and not (cli_run / "report.md").exists()  # of the 6-bit circuit
    card = json.loads((cli_run / "card.json").read_text())  # written again: the new circuit, not yet evaluated
    assert card["fhe"]["n_bits"] == 5 and card["evaluation"] is None and card["pin"] != before["pin"]
    assert card["model"]["sha256"] == before["model"]["sha256"] and "n_bits 5" in (cli_run / "card.md").read_text()
    done = cli("evaluate", "--run", str(cli_run), "--data", str(tmp_path / "mine.npz"), "--fhe-samples", "2")
    assert done.returncode == 0, done.stderr
    assert not (cli_run / "report.json").exists()  # the file's figures never stand in for the test split's
    report = json.loads((cli_run / "evaluations" / "mine.npz" / "report.json").read_text())
    assert (report["n_bits"], report["n_test"], report["agreement"]["fhe_vs_clear"]) == (5, 40, 1.0)
    assert report["evaluated_on"] == str(tmp_path / "mine.npz")
    # none of the training split's; real FHE's first rows come with the clear model's figure on the same rows
    assert set(report["accuracy"]) == {"fhe_clear", "fhe_simulate", "fhe_execute", "fhe_clear_on_execute_rows"}
    assert "train" not in report["timing_s"]
    title = f"# fedfhe evaluation of mine.npz: logistic model {card['model']['sha256'][:12]}, n_bits 5 (trained on"
    assert (cli_run / "evaluations" / "mine.npz" / "report.md").read_text().startswith(title)
    assert (cli_run / "evaluations" / "mine.npz" / "confusion_matrix.png").is_file()
    first = (cli_run / "evaluations" / "mine.npz" / "report.json").read_bytes()
    (tmp_path / "other").mkdir()  # another partner's file of the same name gets a folder of its own
    np.savez(tmp_path / "other" / "mine.npz", X=test.X_test[40:70], y=test.y_test[40:70])
    other = ("--data", str(tmp_path / "other" / "mine.npz"), "--data-dir", str(tmp_path))
    done = cli("evaluate", "--run", str(cli_run), *other, "--fhe-samples", "2")
    assert "--data-dir applies to --dataset mnist only; ignored" in done.stderr  # a digits run reads no MNIST files
    assert done.returncode == 0 and "evaluations/mine.npz-2/report.md" in "".join(done.stderr.split()), done.stderr
    assert json.loads((cli_run / "evaluations" / "mine.npz-2" / "report.json").read_text())["n_test"] == 30
    assert (cli_run / "evaluations" / "mine.npz" / "report.json").read_bytes() == first
    assert list((tmp_path / "tmp").iterdir()) == []  # no folder of concrete-python's is left behind


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def bad_inputs(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, expected message) for every kind of bad input the CLI must refuse."""
    np.save(tmp / "nan.npy", np.full((3, 64), np.nan))
    np.savez(tmp / "wrong.npz", X=np.zeros((3, 10)), y=np.zeros(3))
    np.savez(tmp / "nanl.npz", X=np.full((3, 64), np.nan), y=np.zeros(3))
    np.savez(tmp / "other.npz", X=np.zeros((3, 64)), y=np.array([1, 42, 3]))  # 42: no digit
    (tmp / "fake.npz").write_bytes(b"PK\x03\x04 not really")
    (tmp / "afile").write_text("a file where a folder should be")
    (tmp / "empty.csv").write_text("")
    (tmp / "ragged.csv").write_text("a,b,label\n1,2,0\n3,4\n")
    np.save(tmp / "rows.npy", np.zeros((40, 64)))  # 20 KiB
    with open(tmp / "huge.npy", "wb") as f:  # a header declaring 8 TB of rows, and no rows
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**12, 1)})
    r, fresh = str(run), str(tmp / "fresh")  # fresh must not even be created
    return [
        (["train", "--dataset", "digits", "--out", r], f"{r} already holds a run: pass --force to start over"),
        (["run", "--dataset", "digits", "--out", r], f"or continue it with: fedfhe train --resume {r}"),
        (["train", "--dataset", "digits", "--seed", "-1", "--out", fresh], "--seed must be between 0 and 2**32 - 1"),
        (["federation", "split", "--seed", "-1", "--out", fresh], "--seed must be between 0 and 2**32 - 1"),
        (
            ["train", "--dataset", "digits", "--clients", "1400", "--partitioning", "dirichlet", "--alpha", "0.001"]
            + ["--out", fresh],
            "cannot partition 1437 samples among 1400 clients",
        ),
        (["evaluate", "--run", r, "--data", str(tmp / "empty.csv")], "empty.csv: no data"),
        (["compile", "--run", r, "--calibration", str(tmp / "ragged.csv")], "line 3 has 2 values, the header 3"),
        (
            ["evaluate", "--run", r, "--data", str(tmp / "rows.npy"), "--max-input-mb", "0.01"],
            "MiB on disk, more than the 0.01 MiB allowed",
        ),
        (
            ["compile", "--run", r, "--calibration", str(tmp / "huge.npy")],
            "MiB declared, more than the 1024 MiB allowed",
        ),
        (["compile", "--run", r, "--max-input-mb", "0"], "--max-input-mb must be > 0"),
        (["run", "--dataset", "cifar", "--out", r], "unknown data set 'cifar'"),
        (["run", "--dataset", "digits", "--clients", "5000", "--out", r], "--clients 5000 is more than"),
        (["run", "--dataset", "digits", "--rounds", "0", "--out", r], "--rounds must be at least 1"),
        (["run", "--dataset", "digits", "--n-bits", "1", "--out", r], "--n-bits must be between 2 and 12"),
        (["run", "--dataset", "digits", "--fhe-samples", "100000", "--out", r], "--fhe-samples must be between"),
        (["run", "--dataset", "mnist", "--data-dir", str(tmp / "none"), "--out", r], "data directory not found"),
        (["run", "--dataset", "digits", "--out", str(tmp / "afile" / "sub")], "cannot write to"),
        (["train", "--dataset", "digits", "--partitioning", "zipf", "--out", r], "unknown partitioning 'zipf'"),
        (["train", "--resume", str(tmp)], "not a resumable run"),
        (["train", "--dataset", "digits", "--strategy", "fedsgd", "--out", r], "unknown strategy 'fedsgd'"),
        (["train", "--dataset", "digits", "--secagg", "--strategy", "krum", "--out", r], "--secagg needs"),
        (["train", "--dataset", "digits", "--dp", "--clipping-norm", "0", "--out", r], "--dp needs"),
        (["compile", "--run", str(tmp)], "model file not found"),
        (["compile", "--run", r, "--calibration", str(tmp / "nan.npy")], "calibration data contains NaN"),
        (["compile", "--run", r, "--calibration", str(tmp / "missing.npy")], "file not found"),
        (["compile", "--run", r, "--n-bits", "6/13"], "--n-bits must be between 2 and 12 (got 6/13)"),
        (["evaluate", "--run", r, "--data", str(tmp / "wrong.npz")], "test data has shape (3, 10)"),
        (["evaluate", "--run", r, "--data", str(tmp / "nanl.npz")], "test data contains NaN"),
        (["evaluate", "--run", r, "--data", str(tmp / "fake.npz")], "cannot read"),
        (["evaluate", "--run", r, "--data", str(tmp / "other.npz")], "label 42 is not one of the model's classes"),
        (["evaluate", "--run", r, "--positive-class", "3"], "--positive-class applies to two-class models"),
        (["evaluate", "--run", r, "--fhe-samples", "-1"], "--fhe-samples must be between"),
        (["tune", "--run", r, "--n-bits", "4,x"], "--n-bits takes N or INPUTS/WEIGHTS such as 6/4 (got 'x')"),
        (["tune", "--run", r, "--n-bits", "1,4"], "--n-bits must be between 2 and 12"),
        (["tune", "--run", r, "--latency-samples", "0", "--n-bits", "4"], "--latency-samples must be between"),
    ]


def test_bad_inputs_give_one_line_and_keep_the_run(served_run, tmp_path):
    before = snapshot(served_run)  # any digits run: the shared one, which nothing here may change
    for args, message in bad_inputs(served_run, tmp_path):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout
    assert snapshot(served_run) == before
    assert not (tmp_path / "fresh").exists()


@pytest.mark.federation
def test_force_starts_over_removing_only_what_the_old_run_wrote(cli_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(cli_run, old)  # a whole run: partitions, checkpoints, model, fhe/, report
    (old / "notes.txt").write_text("not fedfhe's")
    done = cli("train", "--dataset", "digits", "--clients", "1", "--force", "--out", str(old))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in old.iterdir()) == ["metrics.json", "model.npz", "notes.txt", "train_config.json"]
    assert json.loads((old / "train_config.json").read_text())["training"]["clients"] == 1


def test_model_file_from_elsewhere_is_refused(served_run, tmp_path):
    (tmp_path / "model.npz").write_bytes((served_run / "model.npz").read_bytes()[:200])
    done = cli("compile", "--run", str(tmp_path))
    assert done.returncode == 2 and "not a fedfhe model file" in done.stderr


def test_names_with_bars_and_line_breaks_keep_the_markdown_tables(served_run):
    from fedfhe import card, report
    from fedfhe.rundir import RunDir

    odd = "ward | icu\nnight\\|shift"  # a bar, a line break, and a backslash before a bar
    facts = card.build(RunDir(served_run))
    facts["features"][0]["name"] = facts["classes"][0]["name"] = odd
    summary = json.loads((served_run / "report.json").read_text())
    per_class = summary["metrics"]["per_class"]
    summary["metrics"]["per_class"] = {odd if name == "0" else name: figures for name, figures in per_class.items()}
    for text in (card.markdown(facts), report.markdown(summary)):
        assert "ward \\| icu night\\\\\\|shift" in text
        rows = [line for line in text.splitlines() if line.startswith("|")]
        # cells as GitHub splits a row: at each bar that no backslash escapes
        cells = [len(re.findall(r"\|", re.sub(r"\\.", "", row))) for row in rows]
        headers = [i for i, row in enumerate(rows) if i + 1 < len(rows) and rows[i + 1].startswith("|---")]
        for start, end in zip(headers, [*headers[1:], len(rows)]):
            assert set(cells[start:end]) == {cells[start]}, rows[start:end]


def test_help_groups_options_with_examples_and_names_typos(tmp_path):
    shown = cli("run", "--help").stdout
    for panel in ("Data", "FHE compilation and evaluation", "Output", "Training", "Examples:"):
        assert panel in shown, panel
    done = cli("train", "--dataset", "mnist5k", "--run", str(tmp_path / "x"))
    assert done.returncode == 2 and "unknown data set 'mnist5k' (did you mean 'mnist-5k'?)" in done.stderr
    done = cli("train", "--model", "logisitc", "--run", str(tmp_path / "x"))
    assert done.returncode == 2 and "(did you mean 'logistic'?)" in done.stderr and not (tmp_path / "x").exists()
    done = cli(
        "train", "--dataset", "digits", "--clients", "1", "--data-dir", str(tmp_path), "--run", str(tmp_path / "r")
    )
    assert done.returncode == 0, done.stderr  # --run names the run directory everywhere (--out: the same)
    assert (
        "--data-dir applies to --dataset mnist only; ignored" in done.stderr
        and (tmp_path / "r" / "model.npz").is_file()
    )
