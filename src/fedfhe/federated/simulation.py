"""Run the ClientApp and ServerApp together on Flower's in-process simulation engine."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.simulation import run_simulation
from threadpoolctl import threadpool_limits

from fedfhe.config import TrainConfig
from fedfhe.federated.client_app import build_client_app
from fedfhe.federated.server_app import build_server_app


def client_mods(config: TrainConfig) -> list[Any]:
    """Client-side privacy layers around training: SecAgg+ masking, and clipping of the update for DP (inside it)."""
    if config.secagg:
        from flwr.client.mod import fixedclipping_mod, secaggplus_mod

        return [secaggplus_mod, fixedclipping_mod] if config.dp else [secaggplus_mod]
    if config.dp:
        from flwr.clientapp.mod import fixedclipping_mod

        return [fixedclipping_mod]
    return []


def simulate(
    config: TrainConfig, server_main: Callable[[Grid, Context], None], partition_dir: Path, verbose: bool = False
) -> None:
    """Run the server main against one virtual SuperNode per partition file."""
    backend_config: dict[str, Any] = {
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
        # One BLAS thread in this process (the server's evaluation is small; clients are Ray processes):
        # OpenBLAS 0.3.23's thread pool was seen spinning forever in the server thread's first matmul
        # when several simulations ran in one process (benchmarks, `tune --sweep`).
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=build_server_app(server_main),
                client_app=build_client_app(partition_dir, client_mods(config)),
                num_supernodes=config.clients,
                backend_config=backend_config,
            )
    finally:
        flwr_logger.setLevel(level)
