"""The Python API the README shows: `from fedfhe import TrainConfig, train, run`, progress through callbacks."""

from __future__ import annotations

import json

import pytest

from fedfhe import FedfheError, TrainConfig, pipeline, run


class Recorder:
    """A pipeline Progress that remembers what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, step: str, total: int | None = None) -> None:
        self.events.append(("start", step, total))

    def update(self, done: int, **figures: float) -> None:
        self.events.append(("update", done, *sorted(figures)))


@pytest.mark.federation
@pytest.mark.fhe
def test_run_trains_compiles_evaluates_and_reports_progress(tmp_path, digits):
    progress = Recorder()
    config = TrainConfig(clients=2, rounds=2, local_iters=5)
    result = run(digits, config, tmp_path, n_bits=5, fhe_samples=2, progress=progress)
    assert result.model.metadata["training"] == json.loads((tmp_path / "train_config.json").read_text())["training"]
    assert result.compiled.n_bits == 5 and result.summary["agreement"]["fhe_vs_clear"] == 1.0
    assert json.loads((tmp_path / "report.json").read_text()) == result.summary
    steps = [event[1] for event in progress.events if event[0] == "start"]
    assert steps == ["training", "compiling", "fhe"]
    assert ("update", 2, "accuracy") in progress.events and ("update", 2) in progress.events  # round 2, sample 2


def test_run_checks_every_option_before_writing_anything(tmp_path, digits):
    for options, message in (
        ({"n_bits": 1}, "--n-bits must be between 2 and 12"),
        ({"fhe_samples": 10_000}, "--fhe-samples must be between 0 and the 360"),
        ({"calibration": tmp_path / "none.npy"}, "none.npy: file not found"),
    ):
        with pytest.raises(FedfheError, match=message):
            run(digits, TrainConfig(clients=1), tmp_path / "run", **options)
    with pytest.raises(FedfheError, match="--clients 5000 is more than"):
        pipeline.run(digits, TrainConfig(clients=5000), tmp_path / "run")
    assert not (tmp_path / "run").exists()
