"""Command line: parses options, calls fedfhe's Python API, prints what came out."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfhe.config import DATA, TrainConfig, parse_params
from fedfhe.data import DATASETS
from fedfhe.errors import FedfheError

app = typer.Typer(
    help="Federated training with Flower, then classification of encrypted inputs with Concrete ML.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

FHE, OUTPUT = "FHE compilation and evaluation", "Output"  # option panels in --help (training's: config.py)
TableData = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Your own table (.csv, .xlsx, .parquet, .npz) instead of --dataset; with --schema.",
        rich_help_panel=DATA,
    ),
]
TableSchema = Annotated[
    Path | None,
    typer.Option("--schema", help="The schema of --data or --owners (see `fedfhe schema`).", rich_help_panel=DATA),
]
Owners = Annotated[
    Path | None,
    typer.Option(
        help="A folder with one table per data owner (each a client; --clients is the file count); with --test.",
        rich_help_panel=DATA,
    ),
]
TestFile = Annotated[
    Path | None, typer.Option("--test", help="The server's held-out test table, with --owners.", rich_help_panel=DATA)
]
DatasetName = Annotated[
    str, typer.Option("--dataset", help=f"{' | '.join(DATASETS)} (diabetes is a regression).", rich_help_panel=DATA)
]
DataDir = Annotated[
    Path | None, typer.Option(help="Folder with the four MNIST IDX files (mnist only).", rich_help_panel=DATA)
]
NBits = Annotated[
    str,
    typer.Option(
        help="Quantization bits: N for inputs and weights, or INPUTS/WEIGHTS such as 6/4.", rich_help_panel=FHE
    ),
]
Outputs = Annotated[
    str | None,
    typer.Option(
        help="What a client decrypts: scores, or label (the circuit picks the class; the scores that give the "
        "weights away never leave it; classifiers only)  [default: what the run was compiled for, else scores]",
        rich_help_panel=FHE,
        show_default=False,
    ),
]
Calibration = Annotated[
    Path | None,
    typer.Option(
        help="Real data (.npy/.npz/.csv) to calibrate on instead of the input-range bounds.", rich_help_panel=FHE
    ),
]
FheSamples = Annotated[
    int | None,
    typer.Option(
        help="Test rows to run with real encryption (the rest in FHE simulation)  [default: 100, or all when fewer]",
        rich_help_panel=FHE,
        show_default=False,
    ),
]
RunDirOption = Annotated[Path, typer.Option("--run", help="Run directory.")]
Out = Annotated[
    Path, typer.Option("--run", "--out", help="Run directory to write into (--out: the same).", rich_help_panel=OUTPUT)
]
Verbose = Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.", rich_help_panel=OUTPUT)]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Start over where a run already is: the files fedfhe wrote there go first.",
        rich_help_panel=OUTPUT,
    ),
]
PositiveClass = Annotated[
    str | None,
    typer.Option(
        help="Two classes: the class (name or number) sensitivity, PPV and AUC are about (default: the one the "
        "schema or data set names; training on your own table records it in the model).",
        rich_help_panel=FHE,
    ),
]
OperatingPoint = Annotated[
    str | None,
    typer.Option(
        help="Two classes: the threshold on the positive class's score, chosen on the run's held-out test rows "
        "(evaluate: on the rows evaluated): youden (largest sensitivity + specificity), sensitivity=0.8 (the most "
        "specific one that reaches it) or specificity=0.9 (default: keep the model's; a new model answers the most probable class)",
        rich_help_panel=FHE,
        show_default=False,
    ),
]
Threshold = Annotated[
    float | None,
    typer.Option(
        help="Two classes: answer the positive class when its score is at least this (instead of --operating-point).",
        rich_help_panel=FHE,
    ),
]
MaxInputMb = Annotated[
    float,
    typer.Option(help="Largest data file read (on disk, or as its header declares), in MiB.", rich_help_panel=DATA),
]


EXAMPLES: dict[str, list[str]] = {  # shown under each command's --help
    "train": [
        "fedfhe train --dataset breast-cancer --clients 3 --rounds 5 --run runs/bc",
        "fedfhe train --owners hospitals/ --test test.csv --schema schema.json --run runs/h",
        "fedfhe train --resume runs/bc",
    ],
    "compile": [
        "fedfhe compile --run runs/bc --n-bits 6",
        "fedfhe compile --run runs/bc --n-bits 3/4   # inputs quantized to 3 bits, weights to 4",
        "fedfhe compile --run runs/bc --calibration sample.npy",
        "fedfhe compile --run runs/bc --operating-point sensitivity=0.95   # the threshold, without retraining",
    ],
    "evaluate": [
        "fedfhe evaluate --run runs/bc --fhe-samples 20 --positive-class malignant",
        "fedfhe evaluate --run runs/h --data partner.csv   # report in runs/h/evaluations/partner.csv/",
        "fedfhe evaluate --run runs/h --data partner.csv --threshold 0.3   # a threshold given, on the partner's rows",
    ],
    "run": [
        "fedfhe run --dataset mnist-5k --clients 10 --rounds 5 --run runs/demo",
        "fedfhe run --dataset breast-cancer --model svm --param C=0.5 --positive-class malignant --run runs/bc",
        "fedfhe run --owners hospitals/ --test test.csv --schema schema.json --class-weight balanced "
        + "--operating-point youden --run runs/h   # a rare class: weighed, and a threshold that finds it",
    ],
    "tune": [
        "fedfhe tune --run runs/bc",
        "fedfhe tune --run runs/bc --n-bits 4,6,8 --sweep C=0.1,1,10",
        "fedfhe tune --run runs/bc --n-bits 3,4,3/4 --no-bit-pairs   # exactly these points",
        "fedfhe tune --run runs/bc --metric sensitivity@specificity=0.9 --sweep C=0.1,1,10",
        "fedfhe tune --run runs/bc --promote C=10   # serve a sweep point: it becomes the run's model",
    ],
    "card": [
        "fedfhe card --run runs/bc   # then: fedfhe predict --expect-model PIN ...  (the card's MODEL:SPEC)",
    ],
    "serve": [
        "fedfhe serve --run runs/bc --port 8000 --workers 2",
        "fedfhe serve --run runs/bc --host 0.0.0.0 --tls-cert server.pem --tls-key server.key --tokens tokens.txt",
    ],
    "predict": [
        "fedfhe predict rows.csv --server http://127.0.0.1:8000 --json",
        "fedfhe predict lab.csv --keep patient --on-invalid skip --rejects rejects.csv --out preds.csv",
        "fedfhe predict digit.png --server https://host:8000 --ca-cert ca.crt --expect-model MODEL:SPEC",
        "fedfhe predict test.npy --server http://127.0.0.1:8000 --jobs 2 --out preds.csv",
    ],
    "federation up": [
        "fedfhe federation up --clients 3 --rounds 2 --run runs/fed",
        "fedfhe federation up --clients 3 --secagg --dp --audit --run runs/fed3",
        "fedfhe federation up --owners hospitals/ --test test.csv --schema schema.json --run runs/hfed --compile",
        "fedfhe federation up --clients 3 --ports 9092-9099 --run runs/fed   # ports a firewall lets through",
    ],
    "schema infer": [
        "fedfhe schema infer hospital-a.csv --label outcome --ignore patient --out schema.json",
        "fedfhe schema infer hospitals/ --label outcome --out schema.json   # every owner's file in the folder",
    ],
    "federation certs": [
        "fedfhe federation certs --out certs --host coordinator.example.org --host 10.0.0.5 --nodes 3",
    ],
    "federation split": [
        "fedfhe federation split --dataset mnist-5k --clients 3 --out owners",
    ],
    "schema check": [
        "fedfhe schema check hospital-b.csv --schema schema.json",
        "fedfhe schema check hospital-b.csv --schema schema.json --against test.hashes   # no test row in it?",
    ],
    "schema hashes": [
        "fedfhe schema hashes test.csv --schema schema.json --out test.hashes   # for the owners' --against",
    ],
}


def _examples(command: str) -> str:
    """A --help epilog: the command's examples, one per line."""
    return "Examples:\n\n" + "\n\n".join(EXAMPLES[command])


def training_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command one option per TrainConfig field (defaults and help from the field); it gets `config`.

    The options are declared here once for train, run and federation up.
    """
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]
    added = []
    types: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str}
    types |= {f"{name} | None": kind | None for name, kind in types.items()}
    for f in dataclasses.fields(TrainConfig):
        flag = "--param" if f.name == "params" else f"--{f.name.replace('_', '-')}"
        info = typer.Option(flag, help=f.metadata["help"], rich_help_panel=f.metadata["panel"])
        kind = types.get(str(f.type), list[str])
        default = [] if f.name == "params" else f.default
        added.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])
        )

    @functools.wraps(command)
    def with_config(**options: Any) -> None:
        """The command, called with a TrainConfig made (and so checked) from its options.

        With --owners and no --clients, there is one client per owner file.
        """
        import click

        settings = {f.name: options.pop(f.name) for f in dataclasses.fields(TrainConfig)}
        settings["params"] = parse_params(settings["params"])
        default = click.get_current_context().get_parameter_source("clients") == click.core.ParameterSource.DEFAULT
        if options.get("owners") is not None and default:
            from fedfhe.table import owner_files

            settings["clients"] = len(owner_files(options["owners"]))
        command(config=TrainConfig(**settings), **options)

    parameters = [*own, *added]
    with_config.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    with_config.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_config


STEPS = {"training": "training", "compiling": "compiling the FHE circuit", "fhe": "FHE execute", "tuning": "tuning"}


class Bars:
    """A pipeline Progress drawn with rich: a bar per step, the latest figures in its description."""

    def __init__(self, live: Progress) -> None:
        self.live, self.step, self.total = live, "", 0
        self.task: TaskID | None = None

    def start(self, step: str, total: int | None = None) -> None:
        """Close the previous bar and open one for this step."""
        if self.task is not None:
            self.live.update(self.task, total=self.total or 1, completed=self.total or 1)
        self.step, self.total = step, total or 0
        self.task = self.live.add_task(STEPS.get(step, step), total=total)

    def update(self, done: int, **figures: float) -> None:
        """Move the bar; a round's test score goes into its description."""
        if self.task is None:
            return
        shown = ", ".join(f"test {k} {v:.4g}" for k, v in figures.items())
        description = f"round {done}: {shown}" if self.step == "training" and shown else STEPS.get(self.step)
        self.live.update(self.task, completed=done, description=description)


@contextlib.contextmanager
def _bars() -> Iterator[Progress]:
    """The progress display shared by long steps; it vanishes if the command fails, so a refusal stays one line."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    progress.start()
    try:
        yield progress
    except BaseException:
        progress.live.transient = True
        progress.live.stop()  # not progress.stop(), which adds an empty line on a non-terminal
        raise
    progress.stop()


SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached a training command; it exits with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _training(run_dir: Path) -> Iterator[Bars]:
    """Progress bars for train and run; Ctrl-C or SIGTERM ends the command in one line naming the last checkpoint.

    The signal becomes an exception, so the training unwinds through its cleanup (the simulation's
    processes are killed on the way); signals after the first are ignored, so nothing breaks that cleanup.
    """

    def interrupt(signum: int, _: Any) -> None:
        for number in SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(signum)

    for number in SIGNALS:
        signal.signal(number, interrupt)
    try:
        with _bars() as progress:
            yield Bars(progress)
    except Interrupted as exc:
        console.print(_interruption(run_dir), style="yellow", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(128 + exc.signum) from None


def _interruption(run_dir: Path) -> str:
    """Where an interrupted training stopped, and how to go on."""
    from fedfhe.rundir import RunDir

    run = RunDir(run_dir)
    done = run.last_round()
    if done == 0:
        return "interrupted before the first checkpoint"
    _, config = run.read_config()
    return f"interrupted after round {done} of {config.rounds}; resume with: fedfhe train --resume {run_dir}"


def _warn_unused(dataset: str, data_dir: Path | None, own: bool) -> None:
    """A warning for --data-dir where it does nothing (any data set but mnist, or a user's own table)."""
    if data_dir is not None and (dataset != "mnist" or own):
        console.print("[yellow]warning:[/yellow] --data-dir applies to --dataset mnist only; ignored", soft_wrap=True)


def _warn_unused_by(run: Path, data_dir: Path | None, data: Path | None = None) -> None:
    """The same warning for a command on a run made before: its data set is the run's (or --data)."""
    from fedfhe.rundir import RunDir

    if data_dir is None:
        return
    target = RunDir(run)
    try:
        dataset, _ = target.read_config()
    except FedfheError:
        return  # no readable run: the command says so itself
    _warn_unused(dataset, data_dir, data is not None or target.schema_file.exists())


def _trained(model: Any, out: Path) -> None:
    """One line on the trained model: its score, the centralized baseline, DP's epsilon."""
    config, metrics = model.metadata["training"], model.metadata["metrics"]
    name = model.kind.score_names[0]
    privacy = f", DP epsilon {metrics['privacy']['epsilon']:.3g}" if "privacy" in metrics else ""
    console.print(
        f"trained {config['model']}: test {name} {metrics['final']['score']:.4g} "
        f"(centralized scikit-learn {metrics['centralized']['score']:.4g}{privacy}) -> {out / 'model.npz'}"
    )
    if "concrete_quantized" in metrics:
        console.print(
            f"Concrete ML's own quantized model (8 bits, clear): test {name} {metrics['concrete_quantized']:.4g}"
        )
    _rows(model.metadata)


def _rows(metadata: dict[str, Any]) -> None:
    """A warning when a test row of a user's table is a training row too (by row hashes): its figures are optimistic."""
    from fedfhe.leakage import describe

    found = metadata.get("leakage")
    if found and found["test_in_training"]:
        console.print(f"[yellow]warning:[/yellow] row hashes: {describe(found)}", highlight=False, soft_wrap=True)


def _compiled(compiled: Any, out: Path) -> None:
    """One line on the circuit."""
    from fedfhe.artifacts import n_bits_label

    console.print(
        f"compiled: {compiled.outputs} outputs, n_bits {n_bits_label(compiled.n_bits)}, largest integer {compiled.max_bit_width} bits, "
        f"{compiled.compile_seconds:.1f} s -> {out / 'fhe'}"
    )


def _show(summary: dict[str, Any], out: Path) -> None:
    """Print the headline figures as a table: first what the model must beat, each figure naming its class."""
    from fedfhe import quality
    from fedfhe.report import SCORES, score_label, title

    table = Table(title=f"{title(summary)}; {summary['clients']} client(s), {summary['rounds']} round(s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    figures = summary.get("metrics", {})
    for name, figure in quality.entries(figures):  # with their 95% intervals and counts
        table.add_row(name, quality.shown(figure))
    for group in (*SCORES, "agreement"):
        for name, value in summary.get(group, {}).items():
            shown = "n/a" if value is None else f"{value:.2%}" if group in ("accuracy", "agreement") else f"{value:.4g}"
            table.add_row(f"{group}.{score_label(name, summary['fhe_samples'])}", shown)
    for name in ("train", "compile", "fhe_execute_per_sample"):
        if name not in summary["timing_s"]:  # a file's report: its figures only, not training's
            continue
        value = summary["timing_s"][name]
        table.add_row(f"timing_s.{name}", "n/a" if value is None else f"{value:.3f}")
    table.add_row("circuit.max_bit_width", str(summary["circuit"]["max_bit_width"]))
    Console().print(table)
    if "decision" in figures:
        console.print(f"decision: {figures['decision']}", highlight=False, soft_wrap=True)
    if "warning" in figures:
        console.print(f"[yellow]warning:[/yellow] {figures['warning']}", highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'report.md'}")


def _split(
    config: TrainConfig,
    dataset: str,
    data_dir: Path | None,
    data: Path | None,
    schema: Path | None,
    owners: Path | None,
    test: Path | None,
    max_input_mb: float,
    positive_class: str | None,
) -> Any:
    """The data `train` or `run` names: a bundled set, a user's table, or the owners' files and a test file."""
    from fedfhe import pipeline

    limit, allow = max_input_mb, config.allow_overlap
    return pipeline.dataset(dataset, config.seed, data_dir, data, schema, owners, test, limit, positive_class, allow)


@app.command(epilog=_examples("train"))
@training_options
def train(
    config: TrainConfig,
    dataset: DatasetName = "mnist-5k",
    data_dir: DataDir = None,
    data: TableData = None,
    schema: TableSchema = None,
    owners: Owners = None,
    test: TestFile = None,
    out: Out = Path("runs/latest"),
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its last checkpoint (other options ignored).")
    ] = None,
    force: Force = False,
    max_input_mb: MaxInputMb = 1024.0,
    positive_class: PositiveClass = None,
    verbose: Verbose = False,
) -> None:
    """Train a linear model with Flower on its simulation engine (or centrally with --clients 1)."""
    from fedfhe import pipeline

    target = out if resume is None else resume
    with _training(target) as bars:
        if resume is not None:
            _warn_unused_by(resume, data_dir)
            model = pipeline.resume(resume, data_dir, bars)
        else:
            _warn_unused(dataset, data_dir, data is not None or owners is not None)
            split = _split(config, dataset, data_dir, data, schema, owners, test, max_input_mb, positive_class)
            model = pipeline.train(split, config, out, bars, verbose, force=force)
    _trained(model, target)


@app.command("compile", epilog=_examples("compile"))
def compile_(
    run: RunDirOption = Path("runs/latest"),
    n_bits: NBits = "8",
    calibration: Calibration = None,
    max_input_mb: MaxInputMb = 1024.0,
    outputs: Outputs = None,
    operating_point: OperatingPoint = None,
    threshold: Threshold = None,
    positive_class: PositiveClass = None,
) -> None:
    """Convert the run's model with Concrete ML and compile it, without any training data."""
    from fedfhe import decision, fhe, pipeline
    from fedfhe.artifacts import parse_n_bits

    bits, rule = parse_n_bits(n_bits), decision.parse(operating_point, threshold)
    with console.status("compiling the FHE circuit"), fhe.scratch():
        compiled = pipeline.compile_run(
            run,
            bits,
            calibration,
            max_input_mb=max_input_mb,
            outputs=outputs,
            operating_point=rule,
            positive_class=positive_class,
        )
    _compiled(compiled, run)
    console.print(f"no report of this circuit yet (an earlier circuit's is removed): fedfhe evaluate --run {run}")


@app.command(epilog=_examples("evaluate"))
def evaluate(
    run: RunDirOption = Path("runs/latest"),
    fhe_samples: FheSamples = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Labelled data instead of the test split: .npz with X, y; a table in the run's schema "
            "(.csv, .parquet), else .csv with a label column."
        ),
    ] = None,
    data_dir: DataDir = None,
    max_input_mb: MaxInputMb = 1024.0,
    positive_class: PositiveClass = None,
    operating_point: OperatingPoint = None,
    threshold: Threshold = None,
) -> None:
    """Measure float, quantized, simulated and real FHE accuracy and their agreement.

    On the run's test split the run's report is rewritten; a --data file gets its own, in RUN/evaluations/FILE/
    (FILE-2/ for another file of the same name). A new operating point is stored in the run's model first.
    """
    from fedfhe import decision, fhe, pipeline

    rule = decision.parse(operating_point, threshold)
    _warn_unused_by(run, data_dir, data)
    with _bars() as live, fhe.scratch():
        summary = pipeline.evaluate_run(
            run, fhe_samples, data, data_dir, Bars(live), max_input_mb, positive_class, rule
        )
    _show(summary, run if data is None else pipeline.evaluation_dir(run, data).path)


@app.command(epilog=_examples("run"))
@training_options
def run(
    config: TrainConfig,
    dataset: DatasetName = "mnist-5k",
    data_dir: DataDir = None,
    data: TableData = None,
    schema: TableSchema = None,
    owners: Owners = None,
    test: TestFile = None,
    n_bits: NBits = "8",
    outputs: Outputs = None,
    calibration: Calibration = None,
    fhe_samples: FheSamples = None,
    out: Out = Path("runs/latest"),
    force: Force = False,
    max_input_mb: MaxInputMb = 1024.0,
    positive_class: PositiveClass = None,
    operating_point: OperatingPoint = None,
    threshold: Threshold = None,
    verbose: Verbose = False,
) -> None:
    """Train, compile and evaluate in one go; everything lands in --run."""
    from fedfhe import decision, fhe, pipeline
    from fedfhe.artifacts import parse_n_bits

    bits, rule = parse_n_bits(n_bits), decision.parse(operating_point, threshold)
    _warn_unused(dataset, data_dir, data is not None or owners is not None)
    with _training(out) as bars, fhe.scratch():
        split = _split(config, dataset, data_dir, data, schema, owners, test, max_input_mb, positive_class)
        result = pipeline.run(
            split,
            config,
            out,
            n_bits=bits,
            calibration=calibration,
            fhe_samples=fhe_samples,
            progress=bars,
            verbose=verbose,
            force=force,
            max_input_mb=max_input_mb,
            positive_class=positive_class,
            outputs=outputs or "scores",
            operating_point=rule,
        )
    _trained(result.model, out)
    _compiled(result.compiled, out)
    _show(result.summary, out)


@app.command(epilog=_examples("tune"))
def tune(
    run: RunDirOption = Path("runs/latest"),
    n_bits: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated n_bits to try, each N or INPUTS/WEIGHTS such as 6/4 (default: 2,3,4,5,6,7,8); "
            "with --promote, the point's (default: the recommended one of that value).",
            show_default=False,
        ),
    ] = None,
    bit_pairs: Annotated[
        bool,
        typer.Option(help="Then also try input and weight bits one step apart around the recommended point."),
    ] = True,
    latency_samples: Annotated[
        int, typer.Option(help="Test samples run in real FHE per point; its server time is the fastest of them.")
    ] = 10,
    sweep: Annotated[
        str | None,
        typer.Option(
            help="Also retrain (federated, into RUN/tune/) with each value of one parameter, e.g. C=0.1,1,10."
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="What points are scored by: auc | pr-auc | balanced-accuracy | sensitivity@specificity=S | accuracy "
            "(classifiers), r2 | mae (regressors). Default: auc for two classes, balanced-accuracy for more or "
            "with label outputs, r2 for regressors.",
            show_default=False,
        ),
    ] = None,
    positive_class: PositiveClass = None,
    promote: Annotated[
        str | None,
        typer.Option(
            help="Make a --sweep point the run's model, to serve it, e.g. C=0.1 (with --n-bits: that width); the "
            "run's own model is kept as RUN/model.previous.npz."
        ),
    ] = None,
    data_dir: DataDir = None,
    outputs: Outputs = None,
) -> None:
    """Sweep n_bits (and --sweep): a metric in FHE simulation vs circuit cost; compile the cheapest good point."""
    from fedfhe import fhe, pipeline, tuning
    from fedfhe.artifacts import parse_n_bits

    if promote is not None:
        if sweep or metric or positive_class or outputs:
            raise FedfheError("--promote takes --n-bits only: it serves a point tune.json holds, as it was measured")
        name, given = _assignment("--promote", promote, "NAME=VALUE")
        if len(given) != 1:
            raise FedfheError(f"--promote takes one NAME=VALUE (got {promote!r})")
        width = None if n_bits is None else parse_n_bits(n_bits)
        with console.status("compiling the FHE circuit"), fhe.scratch():
            promoted = pipeline.promote(run, (name, given[0]), width)
        _compiled(promoted.compiled, run)
        kept = f"; the model it replaced is kept in {promoted.previous}" if promoted.previous else ""
        console.print(
            f"{tuning.label(promoted.point)} is now the run's model ({run / 'model.npz'}{kept}); "
            f"no report of it yet: fedfhe evaluate --run {run}",
            soft_wrap=True,
        )
        return
    bits = [parse_n_bits(v) for v in (n_bits or ",".join(map(str, tuning.DEFAULT_GRID["n_bits"]))).split(",")]
    values = None if sweep is None else _assignment("--sweep", sweep, "NAME=V1,V2,...")
    _warn_unused_by(run, data_dir)
    with _bars() as live, fhe.scratch():
        tuned = pipeline.tune_run(
            run, bits, latency_samples, values, data_dir, Bars(live), outputs, bit_pairs, metric, positive_class
        )
    model = tuned.compiled.source
    table = Table(
        title=f"{model.kind} on {model.metadata['dataset']}: {tuning.heading(tuned.metric, tuned.chosen)}",
        caption=tuning.legend(tuned.points),
    )
    for column in ("point", tuned.metric.title, "bootstraps", "circuit bits", "server ms", "output bytes"):
        table.add_column(column, justify="right")
    for p in tuned.points:
        mark = " *" if p is tuned.chosen else ""
        table.add_row(
            f"{tuning.label(p)}{mark}",
            f"{p['score']:.4g}",
            str(p["bootstraps"]),
            str(p["max_bit_width"]),
            f"{p['server_ms']:.1f}",
            str(p["output_bytes"]),
        )
    Console().print(table)
    serve = f"; to serve it: fedfhe tune --run {run} --promote {' '.join(tuning.setting(tuned.chosen['param']))}"
    console.print(
        f"recommended {tuning.label(tuned.chosen)} (*): {tuned.reason}; compiled in {tuned.run.path}; table in "
        f"{run / 'tune.md'}, plot {run / 'pareto.png'}; its report: fedfhe evaluate --run {tuned.run.path}"
        + (serve if tuned.chosen["param"] else ""),
        soft_wrap=True,
    )


def _assignment(option: str, text: str, form: str) -> tuple[str, list[float]]:
    """NAME=numbers, as --sweep (NAME=V1,V2,...) and --promote (NAME=VALUE) take them."""
    name, _, listed = text.partition("=")
    try:
        return name, [float(v) for v in listed.split(",")]
    except ValueError:
        raise FedfheError(f"{option} must look like {form} with numbers (got {text!r})") from None


federation_app = typer.Typer(
    help="Train across processes on Flower's Deployment Engine (SuperLink + SuperNodes).",
    epilog="On other machines: each data owner runs fedfhe-supernode --superlink HOST:PORT (flower-supernode's "
    "options, plus --poll-interval S and --cold), the coordinator flower-superlink with "
    "--disable-runtime-dependency-installation; see docs/multi-host.md.",
)
app.add_typer(federation_app, name="federation")


@federation_app.command("up", epilog=_examples("federation up"))
@training_options
def federation_up(
    config: TrainConfig,
    dataset: DatasetName = "mnist-5k",
    owners: Owners = None,
    test: TestFile = None,
    schema: TableSchema = None,
    out: Out = Path("runs/federation"),
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication (not advised).")] = False,
    audit: Annotated[
        bool, typer.Option("--audit", help="Keep every reply the server receives in OUT/federation/audit/.")
    ] = False,
    ports: Annotated[
        str | None,
        typer.Option(
            help="TCP ports LOW-HIGH the SuperLink and the SuperNodes listen on (the first free ones; default: any)."
        ),
    ] = None,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Then compile the model and evaluate it in FHE, as `fedfhe compile` and `fedfhe evaluate` do by default.",
            rich_help_panel=FHE,
        ),
    ] = False,
    force: Force = False,
    positive_class: PositiveClass = None,
) -> None:
    """Start a SuperLink and N SuperNodes on loopback (TLS, node auth), train, stop them all.

    With --owners, SuperNode i reads the i-th owner file itself, encoded by --schema; the server holds --test.
    """
    import shlex

    from fedfhe import fhe, pipeline
    from fedfhe.federated import deployment
    from fedfhe.rundir import RunDir

    port_range = None if ports is None else deployment.parse_ports(ports)
    data = pipeline.dataset(
        dataset,
        config.seed,
        schema=schema,
        owners=owners,
        test=test,
        positive_class=positive_class,
        allow_overlap=config.allow_overlap,
    )
    if insecure:
        console.print("[yellow]warning:[/yellow] --insecure: traffic is not encrypted and any SuperNode may join")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every started process is stopped
    score = config.kind.score_names[0]
    with _bars() as live:
        bars = Bars(live)
        bars.start("training", config.rounds)
        path = deployment.up(
            data,
            config,
            out,
            insecure=insecure,
            audit=audit,
            force=force,
            on_round=lambda r, m: bars.update(r, **({score: m["score"]} if "score" in m else {})),
            ports=port_range,
        )
    console.print(f"trained on the Deployment Engine -> {path} (logs in {out / 'federation' / 'logs'})")
    _rows(RunDir(out).load_model().metadata)
    if not compile_:
        run = shlex.quote(str(out))
        console.print(f"next: fedfhe compile --run {run}, then fedfhe evaluate --run {run}", soft_wrap=True)
        return
    with _bars() as live, fhe.scratch():
        bars = Bars(live)
        compiled = pipeline.compile_run(out, progress=bars)
        summary = pipeline.evaluate_run(out, progress=bars)
    _compiled(compiled, out)
    _show(summary, out)


@federation_app.command("certs", epilog=_examples("federation certs"))
def federation_certs(
    out: Annotated[Path, typer.Option(help="Folder for ca.crt, server.pem and their keys.")] = Path("certs"),
    host: Annotated[list[str], typer.Option(help="Names and IPs the SuperLink certificate is valid for.")] = [  # noqa: B006
        "127.0.0.1",
        "localhost",
    ],
    nodes: Annotated[int, typer.Option(help="Also make this many SuperNode key pairs.")] = 0,
) -> None:
    """Make a local CA, a SuperLink certificate and SuperNode key pairs (for tests and demos)."""
    from fedfhe.federated.certificates import make_certificates, make_node_key
    from fedfhe.rundir import RunDir

    make_certificates(RunDir(out).create().path, tuple(host))
    for i in range(nodes):
        make_node_key(out, f"node-{i}")
    console.print(f"certificates and keys -> {out}")


@federation_app.command("split", epilog=_examples("federation split"))
def federation_split(
    dataset: DatasetName = "mnist-5k",
    clients: Annotated[int, typer.Option(help="Number of data owners.")] = 10,
    partitioning: Annotated[str, typer.Option(help="iid | dirichlet")] = "iid",
    seed: Annotated[int, typer.Option(help="Seed of the split and the partitions.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for client-<i>.npz, one per data owner.")] = Path("owners"),
) -> None:
    """Write one training file per data owner from a bundled data set (to try a federation on one machine)."""
    from fedfhe.data import load_dataset
    from fedfhe.federated.deployment import write_owner_files
    from fedfhe.rundir import RunDir

    config = TrainConfig(clients=clients, partitioning=partitioning, seed=seed)
    data = load_dataset(dataset, seed=seed)
    config.problem(data)
    files = write_owner_files(data, clients, RunDir(out).create().path, partitioning, seed)
    console.print(f"{len(files)} owner files -> {out}")


flower_app = typer.Typer(help="Flower's own CLI on fedfhe: `flwr run .` on a local SuperLink that installs nothing.")
app.add_typer(flower_app, name="flower")


@flower_app.command(
    "start",
    epilog='Then, from the app\'s folder: flwr run . --stream --run-config "..."; flwr ls; flwr log RUN-ID --show.',
)
def flower_start(
    supernodes: Annotated[int, typer.Option(help="Simulated SuperNodes per run (Flower's num-supernodes).")] = 10,
) -> None:
    """Start Flower's local SuperLink here, running the installed fedfhe; it keeps running for `flwr run .`."""
    from fedfhe.federated import local

    link = local.start(supernodes)
    console.print(
        f"local SuperLink on 127.0.0.1:{local.PORT} (pid {link.pid}, {supernodes} SuperNodes per run, runs land "
        f"in {link.cwd}): now `flwr run .`; `fedfhe flower stop` ends it"
    )


@flower_app.command("stop")
def flower_stop() -> None:
    """Stop the SuperLink on Flower's local port (fedfhe's or Flower's own) and the runs it is running."""
    from fedfhe.federated import local

    pid = local.stop()
    console.print("no local SuperLink was running" if pid is None else f"stopped the local SuperLink (pid {pid})")


schema_app = typer.Typer(help="A data owner's own table and its schema: draft one, check a file against one.")
app.add_typer(schema_app, name="schema")
TableFile = Annotated[
    Path, typer.Argument(help="A table: .csv with a header, .xlsx, .parquet, or .npz (an array per column).")
]
Sep = Annotated[
    str | None, typer.Option(help="A .csv's separator: , ; tab or | (default: the schema's \"format\", else detected).")
]
Decimal = Annotated[
    str | None, typer.Option(help="A .csv's decimal mark: . or , (default: the schema's, else detected).")
]


@schema_app.command("infer", epilog=_examples("schema infer"))
def schema_infer(
    files: Annotated[
        list[Path], typer.Argument(help="Every owner's table (.csv, .xlsx, .parquet, .npz), or a folder of them.")
    ],
    label: Annotated[str, typer.Option(help="The column to predict.")],
    ignore: Annotated[list[str], typer.Option(help="A column to leave out, e.g. an identifier (repeatable).")] = [],  # noqa: B006 - typer's way to declare a repeatable option
    keep: Annotated[
        list[str], typer.Option(help="A column to keep that the draft would ignore (an identifier, dates, free text).")
    ] = [],  # noqa: B006 - as --ignore
    out: Annotated[Path | None, typer.Option(help="Write the draft here (default: print it).")] = None,
) -> None:
    """Draft a schema from every owner's table: ranges and categories over all of them, one line per decision."""
    from rich.markup import escape

    from fedfhe import drafting, table

    if out is not None and out.exists():
        raise FedfheError(f"{out} already exists: choose another --out (nothing was written)")
    paths = [path for given in files for path in (table.owner_files(given) if given.is_dir() else [given])]
    names = [p.name for p in paths] if len({p.name for p in paths}) == len(paths) else [str(p) for p in paths]
    if twice := table.repeated(names):
        raise FedfheError(f"{twice[0]}: given twice")
    draft = drafting.infer({n: table.read_frame(p) for n, p in zip(names, paths)}, label, tuple(ignore), tuple(keep))
    for note in draft.notes:
        said = ("[yellow]warning:[/yellow] " if note.warning else "") + escape(note.text)
        console.print(said, highlight=False, soft_wrap=True)
    text = json.dumps(draft.schema.to_dict(), indent=1)
    if out is None:
        print(text)
        return
    out.write_text(text + "\n")
    console.print(
        f"draft schema -> {out} (review it: every range and category reveals something of your data)", soft_wrap=True
    )


@schema_app.command("check", epilog=_examples("schema check"))
def schema_check(
    file: TableFile,
    schema: Annotated[Path, typer.Option(help="The schema the parties agreed on (JSON).")],
    sep: Sep = None,
    decimal: Decimal = None,
    against: Annotated[
        Path | None,
        typer.Option(
            help="The held-out test table, or its row hashes (.hashes, from `fedfhe schema hashes`): count the rows "
            "FILE shares with it and refuse any."
        ),
    ] = None,
) -> None:
    """Read a table as training would: every column by name, every value against the schema; one line per refusal."""
    from fedfhe import leakage, table

    agreed = table.Schema.load(schema)
    frame = table.read_frame(file, dialect=agreed.dialect.override(sep, decimal))
    rows = agreed.rows(frame, str(file))
    rows.refuse()
    X, y = rows.X, rows.y
    assert y is not None  # rows() reads the label when asked to
    if agreed.label.classes:
        counts = ", ".join(f"{c}: {int((y == i).sum())}" for i, c in enumerate(agreed.label.classes))
    else:
        counts = f"{agreed.label.name} in [{y.min():g}, {y.max():g}]"
    filled = ", ".join(f"{name}: {n}" for name, n in rows.filled_counts(agreed).items())
    console.print(
        f"{file}: {len(X)} rows, {X.shape[1]} model inputs from {len(agreed.features)} features; {counts}"
        + (f"; missing cells filled as the schema declares: {filled}" if filled else "")
        + (f" (read with {frame.attrs['read_as']})" if "read_as" in frame.attrs else ""),
        soft_wrap=True,
        highlight=False,
    )
    if against is None:
        return
    if against.suffix == leakage.HASHES:
        test = leakage.read(against)
    else:
        test = leakage.row_hashes(*table.read_labelled(against, agreed))
    found = leakage.check_owners({str(file): leakage.row_hashes(X, y)}, str(against), test, allow=False)
    console.print(f"{file} against {against}, row hashes: {leakage.describe(found)}", highlight=False, soft_wrap=True)


@schema_app.command("hashes", epilog=_examples("schema hashes"))
def schema_hashes(
    file: TableFile,
    schema: Annotated[Path, typer.Option(help="The schema the parties agreed on (JSON).")],
    out: Annotated[Path, typer.Option(help="Write the hashes here (a .hashes file).")],
) -> None:
    """Hash each row of a table as the model reads it (sha256 of its encoded inputs and label): owners check their
    files against these with `schema check --against` without seeing the rows."""
    from fedfhe import leakage, table

    if out.suffix != leakage.HASHES:
        raise FedfheError(f"--out {out}: name it *{leakage.HASHES} (what `schema check --against` takes as hashes)")
    if out.exists():
        raise FedfheError(f"{out} already exists: choose another --out (nothing was written)")
    rows = leakage.row_hashes(*table.read_labelled(file, table.Schema.load(schema)))
    leakage.write(out, rows)
    console.print(f"{len(rows)} row hashes of {file} -> {out} (sorted, one a line)", soft_wrap=True)


@app.command(epilog=_examples("card"))
def card(run: RunDirOption = Path("runs/latest")) -> None:
    """Write the run's model card (card.json, card.md): hash, inputs in order, classes, training, scores, limits."""
    from fedfhe import card as model_card
    from fedfhe.rundir import RunDir

    written = model_card.write(RunDir(run))
    console.print(f"pin {written['pin']} -> {run / 'card.md'}, {run / 'card.json'}", soft_wrap=True)


@app.command(epilog=_examples("serve"))
def serve(
    run: RunDirOption = Path("runs/latest"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = 8000,
    workers: Annotated[int, typer.Option(help="FHE worker processes.")] = 2,
    threads: Annotated[
        int | None,
        typer.Option(help="Threads per FHE worker (default: the cores / --workers; 1 for replicas on one machine)."),
    ] = None,
    key_store: Annotated[Path | None, typer.Option(help="Evaluation key directory (default RUN/keys).")] = None,
    max_keys: Annotated[int, typer.Option(help="Most evaluation keys stored (least recently used go first).")] = 1000,
    max_key_store_mb: Annotated[float, typer.Option(help="Most MiB of evaluation keys stored.")] = 1024.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 16.0,
    max_key_mb: Annotated[
        float, typer.Option(help="Largest evaluation key upload, in MiB (label outputs need 26-47 MB).")
    ] = 128.0,
    max_inflight_mb: Annotated[
        float, typer.Option(help="Most MiB of request bodies held at once, all clients together (then 503).")
    ] = 512.0,
    max_batch: Annotated[int, typer.Option(help="Most ciphertexts per request.")] = 256,
    timeout: Annotated[float, typer.Option(help="Seconds of FHE work allowed per request.")] = 60.0,
    read_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take to arrive whole (headers and body).")
    ] = 30.0,
    max_connections: Annotated[
        int | None, typer.Option(help="Open connections at most (default: what the descriptor limit allows).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key (PEM).")] = None,
    tokens: Annotated[
        Path | None, typer.Option(help="File of bearer tokens, one per line: then every route but health needs one.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Requests per minute allowed to each token (with --tokens).")
    ] = None,
) -> None:
    """Serve encrypted inference over HTTP(S); the server never holds a private key."""
    import logging

    from fedfhe.rundir import RunDir
    from fedfhe.service import network
    from fedfhe.service.access import Access
    from fedfhe.service.evaluator import Evaluator
    from fedfhe.service.server import Limits, create_app

    if min(max_body_mb, max_key_mb, max_key_store_mb, max_inflight_mb, timeout) <= 0 or min(max_batch, max_keys) < 1:
        raise FedfheError(
            "--max-body-mb, --max-key-mb, --max-key-store-mb, --max-inflight-mb and --timeout must be positive, "
            "--max-batch and --max-keys at least 1"
        )
    if (tls_cert is None) != (tls_key is None):
        raise FedfheError("--tls-cert and --tls-key go together")
    if rate is not None and tokens is None:
        raise FedfheError("--rate limits each token: give --tokens too")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    limits = Limits(
        max_body_bytes=int(max_body_mb * (1 << 20)),
        max_key_bytes=int(max_key_mb * (1 << 20)),
        max_batch=max_batch,
        timeout_s=timeout,
        max_keys=max_keys,
        max_key_store_bytes=int(max_key_store_mb * (1 << 20)),
        max_inflight_bytes=int(max_inflight_mb * (1 << 20)),
    )
    access = None if tokens is None else Access.from_file(tokens, rate)
    pool = Evaluator(RunDir(run).fhe, workers, threads)
    app = create_app(run, key_store, workers, limits, access, pool)
    tls = None if tls_cert is None or tls_key is None else (tls_cert, tls_key)

    def ready(url: str) -> None:
        """Say where the service answers, once it does (a script may wait for this line)."""
        console.print(f"ready on {url}", highlight=False, soft_wrap=True)

    listener = network.listener(app, host, port, tls, read_timeout, max_connections, ready)
    with console.status(f"loading the circuit in {workers} FHE worker(s)"):
        pool.start()
    listener.run()


@app.command(epilog=_examples("predict"))
def predict(
    input: Annotated[
        Path,
        typer.Argument(
            help="Rows (.npy, .npz with X, .csv), raw rows of a model's table (.csv, .xlsx, .parquet), or one image (.png)."
        ),
    ],
    server: Annotated[str, typer.Option(help="URL of `fedfhe serve`.")] = "http://127.0.0.1:8000",
    key_dir: Annotated[
        Path | None, typer.Option(help="Where this client keeps its keys (default: per server, in the cache).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Write each row's result to this .csv or .jsonl as it arrives, instead of printing."),
    ] = None,
    keep: Annotated[
        list[str],
        typer.Option(
            help="Raw rows: a column (an identifier) copied into each result and rejected row; never encoded, "
            "encrypted or sent (repeatable)."
        ),
    ] = [],  # noqa: B006 - typer's way to declare a repeatable option
    on_invalid: Annotated[
        str,
        typer.Option(
            help="Raw rows: refuse (every invalid row listed, nothing predicted) or skip (the valid rows are "
            "predicted, the others written to --rejects, which skip needs)."
        ),
    ] = "refuse",
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="With --on-invalid skip: the rows left out, one line per problem (.csv): row, the --keep columns, "
            "column, value, reason."
        ),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            help="Seconds to keep trying while the server refuses connections (`fedfhe serve` listens only once "
            "its FHE workers are loaded)."
        ),
    ] = 15.0,
    jobs: Annotated[
        int | None, typer.Option(help="Processes that encrypt while the server computes (default: the cores).")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="FEDFHE_TOKEN", help="Bearer token, for a server started with --tokens.")
    ] = None,
    max_input_mb: MaxInputMb = 1024.0,
    ca_cert: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) to verify an https server signed by a private CA.")
    ] = None,
    expect_model: Annotated[
        str | None,
        typer.Option(
            help="Refuse the server unless it serves this model (its sha256) and circuit: the model card's pin "
            "MODEL:SPEC, or MODEL alone for the model only."
        ),
    ] = None,
    expect_spec: Annotated[
        str | None,
        typer.Option(help="Refuse the server unless it serves this client spec (sha256 from its model card)."),
    ] = None,
    sep: Sep = None,
    decimal: Decimal = None,
) -> None:
    """Classify (or regress) inputs on a remote server without ever sending them in the clear.

    Results are numbered by the input's rows, from 1 (a table's first data row), as refusals and --rejects are; a
    table's rows also name the features filled as its schema declares and those outside the owners' observed range.
    """
    import hashlib

    from fedfhe.data import DEFAULT_CACHE
    from fedfhe.service.client import (
        ON_INVALID,
        EncryptedClient,
        ResultsFile,
        keep_columns,
        output_file,
        read_inputs,
        write_rejects,
    )
    from fedfhe.table import read_frame

    if not input.is_file():
        raise FedfheError(f"{input}: file not found")
    if not max_input_mb > 0:
        raise FedfheError(f"--max-input-mb must be > 0 (got {max_input_mb})")
    if not wait >= 0:
        raise FedfheError(f"--wait must be 0 or more seconds (got {wait:g})")
    if out is not None and json_out:
        raise FedfheError("--json prints the results, --out writes them: choose one")
    if on_invalid not in ON_INVALID:
        raise FedfheError(f"--on-invalid must be {' or '.join(ON_INVALID)} (got {on_invalid!r})")
    if (on_invalid == "skip") != (rejects is not None):
        raise FedfheError("--on-invalid skip writes the rows it leaves out to --rejects FILE: give both or neither")
    if rejects is not None:
        output_file(rejects, "--rejects", "rejected rows", (".csv",))
    keys = key_dir or DEFAULT_CACHE / "client-keys" / hashlib.sha256(server.rstrip("/").encode()).hexdigest()[:16]
    limit = int(max_input_mb * (1 << 20))
    records: list[dict[str, Any]] = []
    with EncryptedClient(
        server, keys, token=token, ca_cert=ca_cert, expect_model=expect_model, expect_spec=expect_spec
    ) as client:
        client.connect(
            wait, lambda: console.print(f"waiting up to {wait:g} s for {server} to accept connections", highlight=False)
        )
        kept = None
        if (
            input.suffix.lower() in (".csv", ".xlsx", ".parquet") and client.schema is not None
        ):  # raw rows, by its schema
            X = read_frame(input, limit, client.schema.dialect.override(sep, decimal), as_text=keep)
            if keep:
                X, kept = keep_columns(X, keep, client.schema, str(input))
        elif keep or rejects is not None:
            raise FedfheError(
                f"--keep and --on-invalid skip take raw rows of a model's table (.csv, .xlsx, .parquet); {input} holds numbers"
            )
        else:
            X = read_inputs(input, client.model["n_features"], client.input_range, limit)
        inputs = client.inputs(X, str(input), on_invalid)
        if rejects is not None:
            write_rejects(rejects, inputs.skipped, kept)
            skipped = len({p.row for p in inputs.skipped})
            console.print(
                f"{skipped} of {len(X)} row(s) skipped as invalid ({len(inputs.skipped)} problem(s), written to "
                f"{rejects})",
                highlight=False,
                soft_wrap=True,
            )
        results = contextlib.nullcontext(None) if out is None else ResultsFile(out)
        with results as file, _bars() as progress:
            task = progress.add_task("encrypting, evaluating, decrypting", total=len(inputs.X))
            for batch in client.predict_batches(inputs, jobs=jobs):
                rows = client.records(batch, kept)
                if file is None:
                    records.extend(rows)
                else:
                    file.write(rows)
                progress.update(task, advance=len(rows))
        if file is not None:
            console.print(f"{file.rows} row(s) written to {out}")
            return
        classified = bool(client.model["classes"])
        names = client.class_names
    if json_out:
        print(json.dumps(records))
        return
    shown = [] if kept is None else [str(c) for c in kept.columns]
    _results_table(f"{input.name}: {len(records)} row(s)", records, classified, names, shown)


def _results_table(
    title: str, records: list[dict[str, Any]], classified: bool, names: list[str], kept: list[str]
) -> None:
    """`predict`'s results as a table: row, kept columns, class (and scores) or value, and notes when any row has one."""
    from rich.text import Text

    labels_only = classified and (not records or "scores" not in records[0])
    table = Table(title=f"{title}, {'classified' if classified else 'predicted'} under encryption")
    table.add_column("row", justify="right")
    for name in kept:
        table.add_column(Text(name))
    table.add_column("class" if classified else "value", justify="right")
    if classified and not labels_only:
        table.add_column(Text("scores (" + " ".join(names) + ")"))
    notes = [_notes(record) for record in records]
    if any(notes):
        table.add_column("notes")
    for record, note in zip(records, notes):
        cells = [Text("" if record[k] is None else str(record[k])) for k in kept]
        if not classified:
            cells.append(Text(f"{record['value']:.4g}"))
        else:
            cells.append(Text(str(record["name"])))
            if not labels_only:
                cells.append(Text(" ".join(f"{v:.2f}" for v in record["scores"].values())))
        table.add_row(str(record["row"]), *cells, *([Text(note)] if any(notes) else []))
    Console().print(table)
    if labels_only:
        Console().print("label outputs: the server returns classes only, never the scores", soft_wrap=True)


def _notes(record: dict[str, Any]) -> str:
    """What to know about a result's inputs: the features filled, those beyond the owners' observed range."""
    notes = [("filled", record.get("filled")), ("outside observed", record.get("outside_observed"))]
    return "; ".join(f"{what}: {', '.join(names)}" for what, names in notes if names)


def _warn(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """A warning in one line on stderr."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: bad input ends in one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        with warnings.catch_warnings():  # undone on return: tests run commands in their own process
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # third-party import-time notices
            warnings.showwarning = _warn  # a warning is one line, as an error is
            app()
    except FedfheError as exc:
        for line in getattr(exc, "lines", ()):  # InvalidRows: each bad row, then the one-line error
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    except Interrupted as exc:  # a signal after the training, while its results were printed
        console.print("[red]interrupted[/red]")
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if os.environ.get("FEDFHE_DEBUG"):
            raise
        console.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} (FEDFHE_DEBUG=1 shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
