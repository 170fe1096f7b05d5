"""Run the ClientApp and ServerApp together on Flower's in-process simulation engine."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from flwr.serverapp.strategy import Result
from flwr.simulation import run_simulation

from fedfhe.data import Dataset
from fedfhe.federated.client_app import build_client_app
from fedfhe.federated.server_app import RoundCallback, build_server_app
from fedfhe.federated.task import TrainConfig


def simulate(
    dataset: Dataset,
    config: TrainConfig,
    partition_dir: Path,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
) -> Result:
    """Train with one virtual SuperNode per partition file; returns the strategy's Result."""
    results: list[Result] = []
    server_app = build_server_app(
        config, dataset.X_test, dataset.y_test, dataset.classes, dataset.input_range, results, on_round
    )
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=build_client_app(partition_dir),
                num_supernodes=config.clients,
                backend_config=backend_config,
            )
    finally:
        flwr_logger.setLevel(level)
    if not results:
        raise RuntimeError("the Flower simulation ended without a result")
    return results[0]
