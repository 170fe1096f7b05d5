"""fedfhe: train with Flower federated learning, classify encrypted inputs with Concrete ML."""

from fedfhe.errors import FedfheError

__all__ = ["FedfheError"]
__version__ = "0.1.0"
