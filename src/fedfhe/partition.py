"""Split a training set among clients (IID or label-skewed Dirichlet) with flwr-datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfhe.errors import FedfheError, unknown

SCHEMES = ("iid", "dirichlet")


def partition(
    y: np.ndarray, n_clients: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Return, per client, the indices of its training samples; same seed, same split."""
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if n_clients < 1:
        raise FedfheError(f"clients must be at least 1 (got {n_clients})")
    if n_clients > len(y):
        raise FedfheError(f"{n_clients} clients but only {len(y)} training samples")
    if scheme not in SCHEMES:
        raise unknown("partitioning", scheme, SCHEMES)
    table = HFDataset.from_dict({"index": np.arange(len(y)), "label": np.asarray(y)})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=n_clients)
        partitioner.dataset = table.shuffle(seed=seed)
    else:
        if alpha <= 0:
            raise FedfheError(f"dirichlet alpha must be > 0 (got {alpha})")
        partitioner = DirichletPartitioner(
            num_partitions=n_clients, partition_by="label", alpha=alpha, min_partition_size=1, seed=seed
        )
        partitioner.dataset = table
    try:
        return [np.sort(np.asarray(partitioner.load_partition(i)["index"])) for i in range(n_clients)]
    except ValueError as exc:
        raise FedfheError(f"cannot partition {len(y)} samples among {n_clients} clients: {exc}") from None


def save_partitions(X: np.ndarray, y: np.ndarray, parts: list[np.ndarray], out_dir: Path) -> list[Path]:
    """Write one client-<i>.npz per client: the files each data owner would hold."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(parts):
        path = out_dir / f"client-{i}.npz"
        np.savez(path, X=X[idx], y=y[idx])
        paths.append(path)
    return paths


def label_counts(y: np.ndarray, parts: list[np.ndarray], classes: np.ndarray) -> np.ndarray:
    """Matrix (clients x classes) of label counts."""
    return np.array([[int(np.sum(y[idx] == c)) for c in classes] for idx in parts])


def plot_label_distribution(counts: np.ndarray, classes: np.ndarray | list[str], path: Path) -> None:
    """Stacked bars of each client's labels (`classes`: their names, in the counts' order), to see the skew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(counts) + 3), 4))
    bottom = np.zeros(len(counts))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for j, c in enumerate(classes):
        ax.bar(np.arange(len(counts)), counts[:, j], bottom=bottom, label=str(c), color=cmap(j % cmap.N))
        bottom += counts[:, j]
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_title("Label distribution per client")
    ax.set_xticks(np.arange(len(counts)))
    ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
