"""Command line: a thin layer over fedfhe's Python API (train, compile, evaluate, run)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfhe.errors import FedfheError

app = typer.Typer(
    help="Federated training with Flower, then classification of encrypted inputs with Concrete ML.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

Dataset = Annotated[str, typer.Option(help="digits | mnist-5k | mnist | breast-cancer | diabetes (regression)")]
Model = Annotated[
    str, typer.Option(help="logistic | svm (classifiers); linear | ridge | lasso | elasticnet (regressors)")
]
Param = Annotated[
    list[str], typer.Option(help="Estimator parameter NAME=VALUE (repeatable), e.g. --param C=0.5 --param alpha=0.01.")
]
InputRanges = Annotated[
    str, typer.Option(help="schema (the data set's declared ranges) | clients (owners share rounded min/max).")
]
Engine = Annotated[str, typer.Option(help="sklearn | concrete (fit Concrete ML's own estimator; --clients 1).")]
DataDir = Annotated[Path | None, typer.Option(help="Folder with the four MNIST IDX files (mnist only).")]
Seed = Annotated[int, typer.Option(help="Seed of the split, the partitions and client sampling.")]
Clients = Annotated[int, typer.Option(help="Number of clients; 1 trains centrally.")]
Rounds = Annotated[int, typer.Option(help="Federated rounds.")]
LocalIters = Annotated[int, typer.Option(help="L-BFGS iterations per client per round.")]
Fraction = Annotated[float, typer.Option(help="Fraction of clients that train in each round.")]
Partitioning = Annotated[str, typer.Option(help="iid | dirichlet")]
Alpha = Annotated[float, typer.Option(help="Dirichlet concentration (smaller = more label skew).")]
NBits = Annotated[int, typer.Option(help="Quantization bits of inputs and weights.")]
Calibration = Annotated[
    Path | None, typer.Option(help="Real data (.npy/.npz/.csv) to calibrate on instead of the input-range bounds.")
]
FheSamples = Annotated[int, typer.Option(help="Test samples to run with real encryption.")]
RunDir = Annotated[Path, typer.Option("--run", help="Run directory.")]
Out = Annotated[Path, typer.Option(help="Run directory to write into.")]
Verbose = Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")]
Strategy = Annotated[str, typer.Option(help="fedavg | fedprox | fedmedian | krum | trimmed-mean")]
ProximalMu = Annotated[float, typer.Option(help="FedProx proximal strength, relative to the mean loss.")]
MinClients = Annotated[int, typer.Option(help="Fewest successful clients a round accepts.")]
RoundTimeout = Annotated[float, typer.Option(help="Seconds to wait for the clients in a round.")]
SecAgg = Annotated[bool, typer.Option("--secagg", help="SecAgg+: the server only learns the sum of updates.")]
SecAggShares = Annotated[float, typer.Option(help="SecAgg+ shares per client (a fraction of the clients if < 1).")]
SecAggThreshold = Annotated[float, typer.Option(help="SecAgg+ shares needed to reconstruct (fraction if < 1).")]
SecAggClip = Annotated[float, typer.Option(help="SecAgg+ clipping range of each weighted parameter.")]
SecAggLevels = Annotated[int, typer.Option(help="SecAgg+ quantization levels over the clipping range.")]
SecAggMaxWeight = Annotated[float, typer.Option(help="SecAgg+ bound on a client's sample count.")]
DP = Annotated[bool, typer.Option("--dp", help="Central DP: client-side clipping, Gaussian noise on the sum.")]
NoiseMultiplier = Annotated[float, typer.Option(help="DP noise standard deviation / clipping norm.")]
ClippingNorm = Annotated[float, typer.Option(help="DP bound on the L2 norm of a client's update.")]
TargetDelta = Annotated[float, typer.Option(help="DP delta at which epsilon is reported.")]


def _writable(path: Path) -> Path:
    """Create the run directory and prove it is writable before any long work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise FedfheError(f"cannot write to {path}: {exc.strerror or exc}") from None
    return path


def _progress() -> Progress:
    """The progress display shared by long steps."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


def _train(dataset: Any, config: Any, out: Path, verbose: bool, resume: bool = False) -> Any:
    """Train with a progress bar over rounds."""
    from fedfhe.federated.task import score_names
    from fedfhe.training import train

    kind = "centralized" if config.clients == 1 else f"{config.clients} clients"
    with _progress() as progress:
        bar = progress.add_task(f"training ({kind})", total=config.rounds if config.clients > 1 else None)

        name = score_names(config.model)[0]

        def on_round(r: int, metrics: dict[str, float]) -> None:
            if r > 0:
                progress.update(bar, completed=r, description=f"round {r}: test {name} {metrics['score']:.4g}")

        model = train(dataset, config, out, on_round=on_round, verbose=verbose, resume=resume)
    metrics = model.metadata["metrics"]
    privacy = f", DP epsilon {metrics['privacy']['epsilon']:.3g}" if "privacy" in metrics else ""
    console.print(
        f"trained {config.model}: test {name} {metrics['final']['score']:.4g} "
        f"(centralized scikit-learn {metrics['centralized']['score']:.4g}{privacy}) -> {out / 'model.npz'}"
    )
    if "concrete_quantized" in metrics:
        console.print(
            f"Concrete ML's own quantized model (8 bits, clear): test {name} {metrics['concrete_quantized']:.4g}"
        )
    return model


def _compile(model: Any, run_dir: Path, n_bits: int, calibration: Path | None) -> Any:
    """Compile and export the FHE artifacts."""
    from fedfhe import fhe
    from fedfhe.data import read_table

    sample = None if calibration is None else read_table(calibration)[0]
    with console.status("compiling the FHE circuit"):
        compiled = fhe.compile_model(model, n_bits, sample)
        fhe.export(compiled, run_dir)
    console.print(
        f"compiled: n_bits {n_bits}, largest integer {compiled.max_bit_width} bits, "
        f"{compiled.compile_seconds:.1f} s -> {run_dir / fhe.FHE_DIR}"
    )
    return compiled


def _evaluate(compiled: Any, run_dir: Path, X: Any, y: Any, fhe_samples: int) -> dict[str, Any]:
    """Evaluate, with a progress bar over encrypted samples, then write the report."""
    from fedfhe import fhe, report

    with _progress() as progress:
        bar = progress.add_task("FHE execute (encrypt, run, decrypt)", total=fhe_samples)
        evaluation = fhe.evaluate(
            compiled, X, y, fhe_samples, run_dir / fhe.FHE_DIR, lambda n: progress.update(bar, completed=n)
        )
    summary = report.build(compiled, evaluation, fhe_samples)
    report.write(run_dir, summary, evaluation)
    _show(summary)
    console.print(f"report: {run_dir / report.REPORT_MD}")
    return summary


def _show(summary: dict[str, Any]) -> None:
    """Print the headline figures as a table."""
    title = f"{summary['model']} on {summary['dataset']}: {summary['clients']} client(s), {summary['rounds']} round(s)"
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    from fedfhe.report import SCORES

    for group in (*SCORES, "agreement"):
        for name, value in summary.get(group, {}).items():
            shown = "n/a" if value is None else f"{value:.2%}" if group in ("accuracy", "agreement") else f"{value:.4g}"
            table.add_row(f"{group}.{name}", shown)
    for name in ("train", "compile", "fhe_execute_per_sample"):
        value = summary["timing_s"].get(name)
        table.add_row(f"timing_s.{name}", "n/a" if value is None else f"{value:.3f}")
    table.add_row("circuit.max_bit_width", str(summary["circuit"]["max_bit_width"]))
    Console().print(table)


def _config(dataset: Any, options: dict[str, Any]) -> Any:
    """A TrainConfig from the command's options, checked against the data set."""
    import dataclasses

    from fedfhe.federated.task import TrainConfig, parse_params
    from fedfhe.partition import SCHEMES
    from fedfhe.training import problem_for

    if options["partitioning"] not in SCHEMES:
        raise FedfheError(f"unknown partitioning {options['partitioning']!r}; choose one of: {', '.join(SCHEMES)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in options.items() if k in names}
    settings["params"] = parse_params(options.get("param") or [])
    config = TrainConfig(**settings)
    config.check(len(dataset.y_train))
    problem_for(dataset, config)
    return config


@app.command()
def train(
    dataset: Dataset = "mnist-5k",
    data_dir: DataDir = None,
    clients: Clients = 10,
    rounds: Rounds = 5,
    local_iters: LocalIters = 20,
    fraction: Fraction = 1.0,
    partitioning: Partitioning = "iid",
    alpha: Alpha = 0.5,
    model: Model = "logistic",
    param: Param = [],  # noqa: B006 - typer reads the default, never mutates it
    engine: Engine = "sklearn",
    input_ranges: InputRanges = "schema",
    strategy: Strategy = "fedavg",
    proximal_mu: ProximalMu = 0.01,
    min_clients: MinClients = 1,
    round_timeout: RoundTimeout = 600.0,
    secagg: SecAgg = False,
    secagg_shares: SecAggShares = 0.5,
    secagg_threshold: SecAggThreshold = 0.6,
    secagg_clipping_range: SecAggClip = 16.0,
    secagg_quantization_range: SecAggLevels = 2**22,
    secagg_max_weight: SecAggMaxWeight = 10_000.0,
    dp: DP = False,
    noise_multiplier: NoiseMultiplier = 1.0,
    clipping_norm: ClippingNorm = 1.0,
    target_delta: TargetDelta = 1e-5,
    seed: Seed = 0,
    out: Out = Path("runs/latest"),
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its last checkpoint (other options ignored).")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Train a linear model with Flower on its simulation engine (or centrally with --clients 1)."""
    from fedfhe.data import load_dataset
    from fedfhe.training import saved_config

    if resume is not None:
        name, config = saved_config(resume)
        data = load_dataset(name, data_dir=data_dir, seed=config.seed)
        _train(data, config, _writable(resume), verbose, resume=True)
        return
    data = load_dataset(dataset, data_dir=data_dir, seed=seed)
    config = _config(data, locals())
    _train(data, config, _writable(out), verbose)


@app.command("compile")
def compile_(
    run: RunDir = Path("runs/latest"),
    n_bits: NBits = 8,
    calibration: Calibration = None,
) -> None:
    """Convert the run's model with Concrete ML and compile it, without any training data."""
    from fedfhe.model import MODEL_FILE, LinearModel

    model = LinearModel.load(run / MODEL_FILE)
    _compile(model, _writable(run), n_bits, calibration)


@app.command()
def evaluate(
    run: RunDir = Path("runs/latest"),
    fhe_samples: FheSamples = 100,
    data: Annotated[
        Path | None, typer.Option(help="Labelled data (.npz X,y or .csv with label) instead of the test split.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Measure float, quantized, simulated and real FHE accuracy and their agreement."""
    from fedfhe import fhe
    from fedfhe.data import check_features, load_dataset, read_table
    from fedfhe.model import MODEL_FILE, LinearModel

    model = LinearModel.load(run / MODEL_FILE)
    if data is None:
        split = load_dataset(model.metadata["dataset"], data_dir=data_dir, seed=model.metadata["training"]["seed"])
        X, y = split.X_test, split.y_test
    else:
        X, y = read_table(data)
        if y is None:
            raise FedfheError(f"{data}: no labels (need y in the .npz or a label column in the .csv)")
        X = check_features(X, model.n_features, model.input_range, "test data")
        if len(y) != len(X):
            raise FedfheError(f"{data}: {len(y)} labels for {len(X)} rows")
    _check_fhe_samples(fhe_samples, len(y))
    with console.status("recompiling from the recorded compile inputs"):
        compiled = fhe.load_compiled(run, model)
    _evaluate(compiled, _writable(run), X, y, fhe_samples)


@app.command()
def run(
    dataset: Dataset = "mnist-5k",
    data_dir: DataDir = None,
    clients: Clients = 10,
    rounds: Rounds = 5,
    local_iters: LocalIters = 20,
    fraction: Fraction = 1.0,
    partitioning: Partitioning = "iid",
    alpha: Alpha = 0.5,
    model: Model = "logistic",
    param: Param = [],  # noqa: B006 - typer reads the default, never mutates it
    engine: Engine = "sklearn",
    input_ranges: InputRanges = "schema",
    strategy: Strategy = "fedavg",
    proximal_mu: ProximalMu = 0.01,
    min_clients: MinClients = 1,
    round_timeout: RoundTimeout = 600.0,
    secagg: SecAgg = False,
    secagg_shares: SecAggShares = 0.5,
    secagg_threshold: SecAggThreshold = 0.6,
    secagg_clipping_range: SecAggClip = 16.0,
    secagg_quantization_range: SecAggLevels = 2**22,
    secagg_max_weight: SecAggMaxWeight = 10_000.0,
    dp: DP = False,
    noise_multiplier: NoiseMultiplier = 1.0,
    clipping_norm: ClippingNorm = 1.0,
    target_delta: TargetDelta = 1e-5,
    seed: Seed = 0,
    n_bits: NBits = 8,
    calibration: Calibration = None,
    fhe_samples: FheSamples = 100,
    out: Out = Path("runs/latest"),
    verbose: Verbose = False,
) -> None:
    """Train, compile and evaluate in one go; everything lands in --out."""
    from fedfhe.data import load_dataset
    from fedfhe.fhe import check_n_bits

    check_n_bits(n_bits)
    data = load_dataset(dataset, data_dir=data_dir, seed=seed)
    config = _config(data, locals())
    _check_fhe_samples(fhe_samples, len(data.y_test))
    if calibration is not None and not calibration.is_file():
        raise FedfheError(f"{calibration}: file not found")
    out = _writable(out)
    trained = _train(data, config, out, verbose)
    compiled = _compile(trained, out, n_bits, calibration)
    _evaluate(compiled, out, data.X_test, data.y_test, fhe_samples)


@app.command()
def tune(
    run: RunDir = Path("runs/latest"),
    n_bits: Annotated[str, typer.Option(help="Comma-separated n_bits values to try.")] = "2,3,4,5,6,7,8",
    latency_samples: Annotated[int, typer.Option(help="Test samples run in real FHE per point for latency.")] = 10,
    sweep: Annotated[
        str | None,
        typer.Option(
            help="Also retrain (federated, into RUN/tune/) with each value of one parameter, e.g. C=0.1,1,10."
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Sweep n_bits (and --sweep): score in FHE simulation vs server latency; compile the fastest good point."""
    import dataclasses

    from sklearn.model_selection import ParameterGrid

    from fedfhe import tuning
    from fedfhe.data import load_dataset
    from fedfhe.federated.task import score_names
    from fedfhe.fhe import check_n_bits
    from fedfhe.model import MODEL_FILE, LinearModel
    from fedfhe.training import saved_config

    try:
        grid: dict[str, list[Any]] = {"n_bits": sorted({int(v) for v in n_bits.split(",")})}
    except ValueError:
        raise FedfheError(f"--n-bits must be comma-separated integers (got {n_bits!r})") from None
    check_n_bits(*grid["n_bits"])
    model = LinearModel.load(run / MODEL_FILE)
    split = load_dataset(model.metadata["dataset"], data_dir=data_dir, seed=model.metadata["training"]["seed"])
    if not 1 <= latency_samples <= len(split.y_test):
        raise FedfheError(f"--latency-samples must be between 1 and the {len(split.y_test)} test samples")
    retrain = None
    if sweep is not None:
        name, _, values = sweep.partition("=")
        try:
            grid[name] = sorted({float(v) for v in values.split(",")})
        except ValueError:
            raise FedfheError(f"--sweep must look like NAME=V1,V2,... with numbers (got {sweep!r})") from None
        _, config = saved_config(run)
        for value in grid[name]:  # every setting is checked before any training starts
            dataclasses.replace(config, params={**config.params, name: value}).check(len(split.y_train))
        retrain = tuning.retrainer(run)
    _writable(run)
    with _progress() as progress:
        bar = progress.add_task("tuning", total=len(ParameterGrid(grid)))
        points = tuning.tune(
            model, split.X_test, split.y_test, grid, latency_samples, lambda p: progress.advance(bar), retrain
        )
    key = score_names(model.kind)[0]  # accuracy, or r2 for a regressor
    chosen = tuning.recommend(points, key)
    tuning.write(run, points, chosen, key)
    table = Table(
        title=f"{model.kind} on {model.metadata['dataset']}: n_bits sweep (FHE simulation {key}, real FHE latency)"
    )
    for column in ("point", key, "server ms", "circuit bits", "output bytes"):
        table.add_column(column, justify="right")
    for p in points:
        mark = " *" if p is chosen else ""
        table.add_row(
            f"{tuning.label(p)}{mark}",
            tuning.shown(p, key),
            f"{p['server_ms']:.1f}",
            str(p["max_bit_width"]),
            str(p["output_bytes"]),
        )
    Console().print(table)
    target = run
    for name, value in chosen["param"].items():  # a retrained model wins: compile it where it lives
        target = tuning.retrained_dir(run, name, value)
        model = LinearModel.load(target / MODEL_FILE)
    _compile(model, target, chosen["n_bits"], None)
    console.print(
        f"recommended {tuning.label(chosen)} (*), compiled in {target}; table in {run / 'tune.md'}, "
        f"plot {run / 'pareto.png'}"
    )


federation_app = typer.Typer(help="Train across processes on Flower's Deployment Engine (SuperLink + SuperNodes).")
app.add_typer(federation_app, name="federation")


@federation_app.command("up")
def federation_up(
    dataset: Dataset = "mnist-5k",
    clients: Clients = 10,
    rounds: Rounds = 5,
    local_iters: LocalIters = 20,
    min_clients: MinClients = 1,
    round_timeout: RoundTimeout = 120.0,
    model: Model = "logistic",
    param: Param = [],  # noqa: B006 - typer reads the default, never mutates it
    input_ranges: InputRanges = "schema",
    seed: Seed = 0,
    out: Out = Path("runs/federation"),
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication (not advised).")] = False,
) -> None:
    """Start a SuperLink and N SuperNodes on loopback (TLS, node auth), train, stop them all."""
    from fedfhe import federation
    from fedfhe.data import load_dataset
    from fedfhe.federated.task import TrainConfig, parse_params
    from fedfhe.training import problem_for

    data = load_dataset(dataset, seed=seed)
    config = TrainConfig(
        clients=clients,
        rounds=rounds,
        local_iters=local_iters,
        seed=seed,
        min_clients=min_clients,
        round_timeout=round_timeout,
        model=model,
        params=parse_params(param),
        input_ranges=input_ranges,
    )
    config.check(len(data.y_train))
    problem_for(data, config)
    if insecure:
        console.print("[yellow]warning:[/yellow] --insecure: traffic is not encrypted and any SuperNode may join")
    out = _writable(out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every started process is stopped
    with _progress() as progress:
        bar = progress.add_task(f"federation of {clients} SuperNodes", total=rounds)
        path = federation.up(data, config, out, insecure=insecure, on_round=lambda r: progress.update(bar, completed=r))
    console.print(f"trained on the Deployment Engine -> {path} (logs in {out / 'federation' / 'logs'})")


@federation_app.command("certs")
def federation_certs(
    out: Annotated[Path, typer.Option(help="Folder for ca.crt, server.pem and their keys.")] = Path("certs"),
    host: Annotated[list[str], typer.Option(help="Names and IPs the SuperLink certificate is valid for.")] = [  # noqa: B006
        "127.0.0.1",
        "localhost",
    ],
    nodes: Annotated[int, typer.Option(help="Also make this many SuperNode key pairs.")] = 0,
) -> None:
    """Make a local CA, a SuperLink certificate and SuperNode key pairs (for tests and demos)."""
    from fedfhe import federation

    federation.make_certificates(_writable(out), tuple(host))
    for i in range(nodes):
        federation.make_node_key(out, f"node-{i}")
    console.print(f"certificates and keys -> {out}")


@federation_app.command("split")
def federation_split(
    dataset: Dataset = "mnist-5k",
    clients: Clients = 10,
    partitioning: Partitioning = "iid",
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="Folder for client-<i>.npz, one per data owner.")] = Path("owners"),
) -> None:
    """Write one training file per data owner from a bundled data set (to try a federation on one machine)."""
    from fedfhe import federation
    from fedfhe.data import load_dataset

    data = load_dataset(dataset, seed=seed)
    _config(data, {"clients": clients, "partitioning": partitioning, "seed": seed})
    files = federation.write_owner_files(data, clients, _writable(out), partitioning, seed)
    console.print(f"{len(files)} owner files -> {out}")


def _check_fhe_samples(fhe_samples: int, n_test: int) -> None:
    """--fhe-samples must fit in the test set."""
    if not 0 <= fhe_samples <= n_test:
        raise FedfheError(f"--fhe-samples must be between 0 and the {n_test} test samples (got {fhe_samples})")


@app.command()
def serve(
    run: RunDir = Path("runs/latest"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="FHE worker processes.")] = 2,
    key_store: Annotated[Path | None, typer.Option(help="Evaluation key directory (default RUN/keys).")] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 16.0,
    max_batch: Annotated[int, typer.Option(help="Most ciphertexts per request.")] = 256,
    timeout: Annotated[float, typer.Option(help="Seconds of FHE work allowed per request.")] = 60.0,
) -> None:
    """Serve encrypted inference over HTTP; the server never holds a private key."""
    import logging

    import uvicorn

    from fedfhe.service.server import Limits, create_app

    if max_body_mb <= 0 or max_batch < 1 or timeout <= 0:
        raise FedfheError("--max-body-mb and --timeout must be positive and --max-batch at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    limits = Limits(max_body_bytes=int(max_body_mb * (1 << 20)), max_batch=max_batch, timeout_s=timeout)
    uvicorn.run(
        create_app(run, key_store, workers, limits), host=host, port=port, log_level="warning", access_log=False
    )


@app.command()
def predict(
    input: Annotated[Path, typer.Argument(help="Rows (.npy, .npz with X, .csv) or one image (.png, .jpg).")],
    server: Annotated[str, typer.Option(help="URL of `fedfhe serve`.")] = "http://127.0.0.1:8000",
    key_dir: Annotated[
        Path | None, typer.Option(help="Where this client keeps its keys (default: per server, in the cache).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Classify (or regress) inputs on a remote server without ever sending them in the clear."""
    import hashlib
    import json

    from fedfhe.data import DEFAULT_CACHE
    from fedfhe.service.client import EncryptedClient, read_inputs

    if not input.is_file():
        raise FedfheError(f"{input}: file not found")
    keys = key_dir or DEFAULT_CACHE / "client-keys" / hashlib.sha256(server.rstrip("/").encode()).hexdigest()[:16]
    with EncryptedClient(server, keys) as client:
        X = read_inputs(input, client.model["n_features"], client.input_range)
        with console.status(f"encrypting and classifying {len(X)} row(s)"):
            result = client.predict(X)
    classes = client.model["classes"]
    if not classes:  # a regressor: one value per row
        if json_out:
            print(json.dumps([{"row": i, "value": float(v)} for i, v in enumerate(result.predicted)]))
            return
        table = Table(title=f"{input.name}: {len(X)} row(s), predicted under encryption")
        table.add_column("row", justify="right")
        table.add_column("value", justify="right")
        for i, v in enumerate(result.predicted):
            table.add_row(str(i), f"{v:.4g}")
        Console().print(table)
        return
    if json_out:
        rows = [
            {"row": i, "class": int(c), "scores": dict(zip(map(str, classes), map(float, s)))}
            for i, (c, s) in enumerate(zip(result.predicted, result.scores))
        ]
        print(json.dumps(rows))
        return
    table = Table(title=f"{input.name}: {len(X)} row(s), classified under encryption")
    table.add_column("row", justify="right")
    table.add_column("class", justify="right")
    table.add_column("scores (" + " ".join(map(str, classes)) + ")")
    for i, (c, s) in enumerate(zip(result.predicted, result.scores)):
        table.add_row(str(i), str(c), " ".join(f"{v:.2f}" for v in s))
    Console().print(table)


def main() -> None:
    """Entry point: bad input ends in one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # third-party import-time notices
    try:
        app()
    except FedfheError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the promise is one line, not a traceback
        if os.environ.get("FEDFHE_DEBUG"):
            raise
        console.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} (FEDFHE_DEBUG=1 shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
