"""A run directory: the name of every file a run holds, and the reading and writing of its records.

Training, the Flower apps, FHE compilation, reports, tuning and the service all find their files
here, so a layout change is made once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe.config import TrainConfig
from fedfhe.data import Range
from fedfhe.errors import FedfheError
from fedfhe.kinds import Params
from fedfhe.model import LinearModel

FHE_DIR = "fhe"
FHE_INFO = "fhe.json"
COMPILE_INPUTS = "compile_inputs.npy"
CLIENT_SPEC = "client.zip"  # what a client needs to encrypt and decrypt (Concrete ML's deployment files)
SERVER_SPEC = "server.zip"  # what the server needs to evaluate
SPEC_SCHEMA = "fedfhe-schema.json"  # in client.zip for a user's table: how a client encodes raw rows
SPEC_OBSERVED = "fedfhe-observed-range.json"  # in client.zip for a user's table: the owners' observed ranges


def md_cell(value: object) -> str:
    """A name in a Markdown table cell (report.md, card.md): line breaks become spaces, `|` and backslashes are
    escaped (a name's own backslash would undo the escape of its `|`), so a name cannot end its row or add cells."""
    return " ".join(str(value).splitlines()).replace("\\", "\\\\").replace("|", "\\|")


@dataclass(frozen=True)
class Checkpoint:
    """The state after a completed round: enough to resume bit for bit."""

    round: int
    params: Params
    rows: list[dict[str, Any]]  # per-round metrics so far
    input_range: Range
    server: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's state and DP clipping norm


@dataclass(frozen=True)
class RunDir:
    """One run's folder; paths are properties, records have read and write methods."""

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        """A RunDir is a path-like: it can be passed wherever a path is."""
        return str(self.path)

    model_file = property(lambda self: self.path / "model.npz", doc="The trained model (safe format).")
    previous_model = property(lambda self: self.path / "model.previous.npz", doc="What `tune --promote` replaced.")
    config_file = property(lambda self: self.path / "train_config.json", doc="Data set and config, for --resume.")
    schema_file = property(lambda self: self.path / "schema.json", doc="A user's table: the schema it was read with.")
    metrics_file = property(lambda self: self.path / "metrics.json", doc="Per-round and final training metrics.")
    training_plot = property(lambda self: self.path / "training.png", doc="Score and loss per round.")
    partitions = property(lambda self: self.path / "partitions", doc="client-<i>.npz: each owner's data.")
    partitions_plot = property(lambda self: self.path / "partitions.png", doc="Labels per client.")
    checkpoints = property(lambda self: self.path / "checkpoints", doc="round-<n>.npz after every round.")
    fhe = property(lambda self: self.path / FHE_DIR, doc="Concrete ML's deployment artifacts and fhe.json.")
    keys = property(lambda self: self.path / "keys", doc="The service's default evaluation key store.")
    evaluation_file = property(lambda self: self.path / "evaluation.json", doc="Every prediction evaluated.")
    report_json = property(lambda self: self.path / "report.json", doc="The run's summary, for machines.")
    report_md = property(lambda self: self.path / "report.md", doc="The run's summary, for people.")
    confusion_plot = property(lambda self: self.path / "confusion_matrix.png", doc="A classifier's FHE results.")
    predictions_plot = property(lambda self: self.path / "predictions.png", doc="A regressor's FHE results.")
    roc_plot = property(lambda self: self.path / "roc.png", doc="Two classes: ROC curve and calibration.")
    residuals_plot = property(lambda self: self.path / "residuals.png", doc="A regressor's errors.")
    tune_json = property(lambda self: self.path / "tune.json", doc="Every tuning point and the recommended one.")
    tune_md = property(lambda self: self.path / "tune.md", doc="The tuning table.")
    pareto_plot = property(lambda self: self.path / "pareto.png", doc="Score against FHE latency.")
    federation = property(lambda self: self.path / "federation", doc="A Deployment Engine run's processes.")
    tune = property(lambda self: self.path / "tune", doc="NAME=VALUE/: the runs `tune --sweep` retrained.")
    evaluations = property(lambda self: self.path / "evaluations", doc="FILE/: `evaluate --data FILE` reports.")
    card_json = property(lambda self: self.path / "card.json", doc="The model card, for machines.")
    card_md = property(lambda self: self.path / "card.md", doc="The model card, for people.")

    def written(self) -> list[Path]:
        """Every file and folder fedfhe writes here: what starting over (--force) removes, and nothing else."""
        names = [name for name, value in vars(RunDir).items() if isinstance(value, property)]
        return [getattr(self, name) for name in names]

    def forget_evaluation(self) -> None:
        """Remove the run's report and what it drew: they describe a circuit that was just replaced."""
        drawn = (self.confusion_plot, self.roc_plot, self.predictions_plot, self.residuals_plot)
        for path in (self.evaluation_file, self.report_json, self.report_md, *drawn):
            path.unlink(missing_ok=True)

    def holds_run(self) -> bool:
        """Whether a training started here: its config, its model or its checkpoints."""
        return any(p.exists() for p in (self.config_file, self.model_file, self.checkpoints))

    def clear(self) -> None:
        """Remove everything an earlier run wrote here (see `written`), so a new one starts from nothing."""
        for path in self.written():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def create(self) -> RunDir:
        """Create the folder and prove it is writable, before any long work starts."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            raise FedfheError(f"cannot write to {self.path}: {exc.strerror or exc}") from None
        return self

    def tuned(self, name: str, value: float) -> RunDir:
        """Where `tune --sweep` trains the model with NAME=VALUE."""
        return RunDir(self.tune / f"{name}={value:g}")

    def write_config(self, dataset: str, config: TrainConfig, source: dict[str, str] | None = None) -> None:
        """Record what the run was started with (a user's table: the files it was read from), so --resume can continue it."""
        self.path.mkdir(parents=True, exist_ok=True)
        saved = {"dataset": dataset, "training": dataclasses.asdict(config), **({"source": source} if source else {})}
        self.config_file.write_text(json.dumps(saved))

    def read_source(self) -> dict[str, str]:
        """The files a user's table was read from ({"data": FILE} for runs that predate owners)."""
        try:
            saved = json.loads(self.config_file.read_text())
        except (OSError, ValueError) as exc:
            raise FedfheError(f"{self.config_file}: unreadable ({exc})") from None
        if not isinstance(saved, dict):
            raise FedfheError(f"{self.config_file}: not a run's config")
        source = saved.get("source")
        return dict(source) if isinstance(source, dict) else {"data": str(saved.get("dataset", ""))}

    def read_config(self) -> tuple[str, TrainConfig]:
        """The data set name and training config the run was started with."""
        try:
            saved = json.loads(self.config_file.read_text())
            return str(saved["dataset"]), TrainConfig(**saved["training"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FedfheError(f"{self.path}: not a resumable run ({exc})") from None

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write a round's state atomically (a crash never leaves half a checkpoint)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        rows = json.dumps([row for row in checkpoint.rows if row["round"] <= checkpoint.round])
        tmp = self.checkpoints / f".round-{checkpoint.round:04d}.npz"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                coef=checkpoint.params[0],
                intercept=checkpoint.params[1],
                input_low=checkpoint.input_range[0],
                input_high=checkpoint.input_range[1],
                rows=np.frombuffer(rows.encode(), dtype=np.uint8),
                **{f"server-{name}": value for name, value in checkpoint.server.items()},
            )
        tmp.replace(self.checkpoints / f"round-{checkpoint.round:04d}.npz")

    def checkpointed_rounds(self) -> int:
        """How many rounds have a checkpoint."""
        return len(list(self.checkpoints.glob("round-*.npz")))

    def last_round(self) -> int:
        """The round of the last checkpoint, 0 before the first."""
        return max((int(p.stem.split("-")[1]) for p in self.checkpoints.glob("round-*.npz")), default=0)

    def load_checkpoint(self) -> Checkpoint:
        """The last completed round's state."""
        files = sorted(self.checkpoints.glob("round-*.npz"))
        if not files:
            raise FedfheError(f"{self.checkpoints}: no checkpoint to resume from")
        try:
            with np.load(files[-1], allow_pickle=False) as f:
                params = [f["coef"], f["intercept"]]
                input_range = (f["input_low"], f["input_high"])
                rows = json.loads(f["rows"].tobytes())
                server = {name.removeprefix("server-"): f[name] for name in f.files if name.startswith("server-")}
        except (OSError, ValueError, KeyError) as exc:
            raise FedfheError(f"{files[-1]}: unreadable checkpoint ({exc})") from None
        return Checkpoint(int(files[-1].stem.split("-")[1]), params, rows, input_range, server)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """metrics.json."""
        self.metrics_file.write_text(json.dumps(metrics, indent=2))

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json, as written."""
        try:
            metrics = json.loads(self.metrics_file.read_text())
        except (OSError, ValueError) as exc:
            raise FedfheError(f"{self.metrics_file}: unreadable ({exc})") from None
        return dict(metrics)

    def save_model(self, model: LinearModel) -> None:
        """model.npz, written atomically."""
        model.save(self.model_file)

    def load_model(self) -> LinearModel:
        """model.npz, refused unless an untouched fedfhe model."""
        return LinearModel.load(self.model_file)
