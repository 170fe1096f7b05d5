"""What differential privacy spends: epsilon from Flower's RDP accountant."""

from __future__ import annotations

from typing import Any

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedfhe.config import TrainConfig


def privacy_spent(config: TrainConfig) -> dict[str, Any]:
    """Epsilon at the target delta after all rounds.

    Client-level DP (one client's whole data set is the unit protected). No amplification by
    sampling is claimed: conservative, and true whatever the client sampling.
    """
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=config.target_delta,
            population_size=config.clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(
        GaussianPrivacyEvent(config.noise_multiplier, config.sampled, config.clients), count=config.rounds
    )
    epsilon = accountant.get_epsilon(config.target_delta) if config.noise_multiplier > 0 else float("inf")
    return {
        "epsilon": epsilon,
        "delta": config.target_delta,
        "noise_multiplier": config.noise_multiplier,
        "clipping_norm": config.clipping_norm,
        "unit": "client",
    }
