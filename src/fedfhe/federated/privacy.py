"""What differential privacy spends, and the noise that keeps it within a target: RDP accounting (dp-accounting).

The guarantee is client-level: neighbouring federations differ by one client's whole data set
(added or removed). Without SecAgg+, each client joins a round independently with probability q
(--fraction), so the accountant amplifies by Poisson sampling; SecAgg+ samples a fixed number of
clients through Flower's legacy workflow, so no amplification is claimed there.
"""

from __future__ import annotations

from typing import Any

from fedfhe.config import TrainConfig
from fedfhe.errors import FedfheError

DEFAULT_NOISE = 1.0
SEARCHED = (0.05, 200.0)  # noise multipliers --target-epsilon searches between


def epsilon(config: TrainConfig, noise: float, rounds: int) -> float:
    """Epsilon at the target delta after `rounds` rounds with this noise multiplier."""
    if rounds == 0:
        return 0.0
    if noise <= 0:
        return float("inf")
    import dp_accounting  # 0.5 s to import: only DP runs pay it, not every training
    from dp_accounting import rdp

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise)
    if config.poisson and config.fraction < 1:
        event = dp_accounting.PoissonSampledDpEvent(config.fraction, event)
    accountant = rdp.RdpAccountant()
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(config.target_delta))


def noise_multiplier(config: TrainConfig) -> float:
    """The noise multiplier: as given, or the smallest that keeps all rounds within --target-epsilon."""
    if config.target_epsilon is None:
        return DEFAULT_NOISE if config.noise_multiplier is None else config.noise_multiplier
    low, high = SEARCHED
    if epsilon(config, high, config.rounds) > config.target_epsilon:
        raise FedfheError(
            f"--target-epsilon {config.target_epsilon:g} is out of reach in {config.rounds} rounds at --fraction "
            f"{config.fraction:g} (noise multiplier {high:g} spends more): sample fewer clients or train fewer rounds"
        )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if epsilon(config, middle, config.rounds) > config.target_epsilon else (low, middle)
    return high


def privacy_spent(
    config: TrainConfig, noise: float | None = None, clipping_norm: float | None = None
) -> dict[str, Any]:
    """What all rounds spent, and the terms of the guarantee (clipping_norm: the last round's, if adapted)."""
    noise = noise_multiplier(config) if noise is None else noise
    return {
        "epsilon": epsilon(config, noise, config.rounds),
        "delta": config.target_delta,
        "noise_multiplier": noise,
        "clipping": config.clipping,
        "clipping_norm": config.clipping_norm if clipping_norm is None else clipping_norm,
        "rounds": config.rounds,
        "sampling": f"poisson, q={config.fraction:g}" if config.poisson else "fixed-size, no amplification claimed",
        "unit": "client",
        "neighbouring": "add or remove one client",
        "accountant": "RDP (dp-accounting)",
    }
