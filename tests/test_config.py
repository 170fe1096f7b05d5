"""TrainConfig is the one source of training settings: CLI options, Flower run config, saved runs."""

from __future__ import annotations

import dataclasses
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from flwr.common.config import parse_config_args
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfhe import TrainConfig
from fedfhe.config import INPUT_RANGES, SERVER_OPTIMIZERS, STRATEGIES, run_config_key
from fedfhe.errors import FedfheError
from fedfhe.federated.deployment import RUN_SETTINGS, to_toml
from fedfhe.kinds import KINDS
from fedfhe.partition import SCHEMES
from fedfhe.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)
CLASS_WEIGHTS = ["balanced", "malignant=2.5", "benign=0.5, malignant=3", "7=1e-3"]
SHARE = st.one_of(st.floats(0.01, 0.99), st.integers(1, 100).map(float))  # a fraction or a count


@st.composite
def params(draw: Any, model: str, central: bool) -> dict[str, Any]:
    """Estimator parameters scikit-learn accepts: the federated ones, and central-only ones at one client."""
    chosen: dict[str, Any] = {}
    for name in KINDS[model].federated:
        if draw(st.booleans()):
            chosen[name] = draw(st.floats(0, 1) if name == "l1_ratio" else POSITIVE)
    if central and draw(st.booleans()):
        chosen["fit_intercept"] = draw(st.booleans())
        if model != "linear":  # scikit-learn 1.5's LinearRegression has no tol
            chosen["tol"] = draw(st.floats(min_value=1e-8, max_value=1.0))
        if model == "logistic":
            chosen["solver"] = draw(st.sampled_from(["lbfgs", "newton-cg", "sag", "saga"]))
    return chosen


@st.composite
def configs(draw: Any) -> TrainConfig:
    """Any valid training config, every field drawn."""
    clients = draw(st.integers(1, 5000))
    model = draw(st.sampled_from(sorted(KINDS)))
    fraction = draw(st.floats(min_value=0.001, max_value=1.0))
    sampled = max(int(clients * fraction), 1)
    strategies = [s for s in STRATEGIES if s != "fedprox" or KINDS[model].smooth]
    strategy = draw(st.sampled_from(strategies))
    averaging = strategy in ("fedavg", "fedprox")
    dp = draw(st.booleans()) and averaging and clients >= 2
    optimizer = draw(st.sampled_from(sorted(SERVER_OPTIMIZERS)))
    secagg = draw(st.booleans()) and averaging and sampled >= 3
    noise = draw(st.sampled_from(["noise_multiplier", "target_epsilon", None])) if dp else None
    return TrainConfig(
        clients=clients,
        rounds=draw(st.integers(1, 10**6)),
        local_iters=draw(st.none() | st.integers(1, 10**6)),
        fraction=fraction,
        partitioning=draw(st.sampled_from(SCHEMES)),
        alpha=draw(POSITIVE),
        seed=draw(st.integers(0, 2**32 - 1)),
        model=model,
        params=draw(params(model, clients == 1)),
        class_weight=None if KINDS[model].regression else draw(st.none() | st.sampled_from(CLASS_WEIGHTS)),
        engine=draw(st.sampled_from(["sklearn", "concrete"] if clients == 1 else ["sklearn"])),
        input_ranges=draw(st.sampled_from(INPUT_RANGES)),
        strategy=strategy,
        proximal_mu=draw(st.floats(min_value=0, max_value=100)),
        server_optimizer=optimizer,
        server_lr=draw(st.none() | POSITIVE),
        server_momentum=draw(st.none() | st.floats(0, 0.99)) if optimizer == "sgd" else None,
        min_clients=draw(st.integers(1, sampled)),
        round_timeout=draw(POSITIVE),
        secagg=secagg,
        secagg_shares=draw(SHARE),
        secagg_threshold=draw(SHARE),
        secagg_clipping_range=draw(POSITIVE),
        secagg_quantization_range=draw(st.integers(2, 2**40)),
        secagg_max_weight=draw(POSITIVE),
        dp=dp,
        noise_multiplier=draw(st.floats(min_value=0, max_value=100)) if noise == "noise_multiplier" else None,
        target_epsilon=draw(POSITIVE) if noise == "target_epsilon" else None,
        clipping="fixed" if secagg or draw(st.booleans()) else "adaptive",
        clipping_norm=draw(POSITIVE),
        clip_quantile=draw(st.floats(min_value=0.01, max_value=0.99)),
        target_delta=draw(st.floats(min_value=1e-12, max_value=0.5)),
    )


@settings(max_examples=150, deadline=None)
@given(configs())
def test_every_field_survives_the_flower_run_config_and_the_saved_run(config):
    entries = config.to_run_config()
    assert set(entries) == {run_config_key(f) for f in dataclasses.fields(TrainConfig)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run_config.toml"
        path.write_text(to_toml(entries))
        parsed = parse_config_args([str(path)])  # exactly how `flwr run --run-config FILE` reads it
        assert TrainConfig.from_run_config(parsed) == config
        RunDir(tmp).write_config("digits", config)
        assert RunDir(tmp).read_config() == ("digits", config)
    assert TrainConfig(**dataclasses.asdict(config)) == config  # as the model file's metadata keeps it


def test_a_run_config_without_a_key_keeps_its_default_and_a_wrong_type_is_refused():
    assert TrainConfig.from_run_config({"clients": 1, "params": "C=0.5 solver='saga'"}) == TrainConfig(
        clients=1, params={"C": 0.5, "solver": "saga"}
    )
    with pytest.raises(FedfheError, match="run config num-server-rounds must be int"):
        TrainConfig.from_run_config({"num-server-rounds": "five"})
    with pytest.raises(FedfheError, match="run config params:"):
        TrainConfig.from_run_config({"params": "C='0.5"})


def test_the_flower_app_config_in_pyproject_is_trainconfigs_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == {**RUN_SETTINGS, **TrainConfig().to_run_config()}


@pytest.mark.parametrize("command", [["train"], ["run"], ["federation", "up"]])
def test_training_commands_take_every_field_with_trainconfigs_default(command):
    from fedfhe.cli import app

    group: Any = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]
    options = {p.name: p for p in group.params}
    for f in dataclasses.fields(TrainConfig):
        option = options[f.name]
        flag = "--param" if f.name == "params" else f"--{f.name.replace('_', '-')}"
        assert flag in option.opts
        assert option.default == ([] if f.name == "params" else f.default), f.name
        assert option.help == f.metadata["help"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rounds": 2.5}, "--rounds must be int"),
        ({"secagg": "yes"}, "--secagg must be bool"),
        ({"clients": True}, "--clients must be int"),
        ({"params": ["C=1"]}, "--params must map parameter names to values"),
        ({"proximal_mu": -1.0}, "--proximal-mu must be >= 0"),
        ({"round_timeout": 0}, "--round-timeout must be > 0 seconds"),
        ({"alpha": 0}, "--alpha must be > 0"),
        ({"engine": "torch"}, "unknown engine 'torch'; choose one of: sklearn, concrete"),
        ({"clients": 1, "params": {"penalty": "l1"}}, "--param: Solver lbfgs supports only 'l2' or None penalties"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(settings, message):
    with pytest.raises(FedfheError, match=message):
        TrainConfig(**settings)
