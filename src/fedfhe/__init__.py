"""fedfhe: train with Flower federated learning, classify encrypted inputs with Concrete ML.

`from fedfhe import TrainConfig, train, run` gives the training config, one training (a Flower
simulation, or a central fit) and the whole pipeline; `train` and `run` are imported on first use.
"""

from typing import Any

from fedfhe.config import TrainConfig
from fedfhe.errors import FedfheError

__all__ = ["FedfheError", "TrainConfig", "run", "train"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import `train` (fedfhe.training) and `run` (fedfhe.pipeline) when first asked for."""
    if name == "train":
        from fedfhe.training import train

        return train
    if name == "run":
        from fedfhe.pipeline import run

        return run
    raise AttributeError(f"module 'fedfhe' has no attribute {name!r}")
