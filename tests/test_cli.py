"""The CLI end to end (a real subprocess), and one-line errors for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fedfhe


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
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
    return out


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


def test_compile_and_evaluate_again_on_user_data(cli_run, tmp_path):
    from fedfhe.data import load_dataset

    test = load_dataset("digits", seed=0)
    np.savez(tmp_path / "mine.npz", X=test.X_test[:40], y=test.y_test[:40])
    assert fedfhe("compile", "--run", str(cli_run), "--n-bits", "5").returncode == 0
    done = fedfhe("evaluate", "--run", str(cli_run), "--data", str(tmp_path / "mine.npz"), "--fhe-samples", "2")
    assert done.returncode == 0, done.stderr
    report = json.loads((cli_run / "report.json").read_text())
    assert (report["n_bits"], report["n_test"], report["agreement"]["fhe_vs_clear"]) == (5, 40, 1.0)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def bad_inputs(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, expected message) for every kind of bad input the CLI must refuse."""
    np.save(tmp / "nan.npy", np.full((3, 64), np.nan))
    np.savez(tmp / "wrong.npz", X=np.zeros((3, 10)), y=np.zeros(3))
    np.savez(tmp / "nanl.npz", X=np.full((3, 64), np.nan), y=np.zeros(3))
    (tmp / "fake.npz").write_bytes(b"PK\x03\x04 not really")
    (tmp / "afile").write_text("a file where a folder should be")
    r = str(run)
    return [
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
        (["compile", "--run", r, "--n-bits", "13"], "--n-bits must be between 2 and 12"),
        (["evaluate", "--run", r, "--data", str(tmp / "wrong.npz")], "test data has shape (3, 10)"),
        (["evaluate", "--run", r, "--data", str(tmp / "nanl.npz")], "test data contains NaN"),
        (["evaluate", "--run", r, "--data", str(tmp / "fake.npz")], "cannot read"),
        (["evaluate", "--run", r, "--fhe-samples", "-1"], "--fhe-samples must be between"),
        (["tune", "--run", r, "--n-bits", "4,x"], "--n-bits must be comma-separated integers"),
        (["tune", "--run", r, "--n-bits", "1,4"], "--n-bits must be between 2 and 12"),
        (["tune", "--run", r, "--latency-samples", "0", "--n-bits", "4"], "--latency-samples must be between"),
    ]


def test_bad_inputs_give_one_line_and_keep_the_run(cli_run, tmp_path):
    before = snapshot(cli_run)
    for args, message in bad_inputs(cli_run, tmp_path):
        done = fedfhe(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout
    assert snapshot(cli_run) == before


def test_model_file_from_elsewhere_is_refused(cli_run, tmp_path):
    (tmp_path / "model.npz").write_bytes((cli_run / "model.npz").read_bytes()[:200])
    done = fedfhe("compile", "--run", str(tmp_path))
    assert done.returncode == 2 and "not a fedfhe model file" in done.stderr
