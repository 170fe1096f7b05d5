"""Model extraction by a prediction client: how many queries copy the served model, and how long they take.

A client of `fedfhe serve` decrypts today the dequantized scores of the linear model ("scores"); a
label-only circuit gives it the predicted class alone ("label"). Per data set, mode and query budget:
(1) equation solving (Tramer et al. 2016): one least-squares solve for the weights and bias behind the
decrypted scores (scores mode only); (2) a scikit-learn LogisticRegression fitted on the answered
labels. Queries are drawn uniformly in the model's declared input box, or are the attacker's own rows
of the same population (the training split, as a partner holds). Each copy is scored on the test
split: agreement with the served model's labels, and accuracy. Answers come from FHE simulation, the
values a client decrypts; a few rows in real FHE time the server per row. The attacker's time is what
`fedfhe serve --rate 60` (requests per minute per token) and the server's FHE work impose.
Models are trained once (5 clients, 3 rounds) and kept in $TMPDIR/fedfhe-extraction-bench.
Usage: .venv/bin/python benchmarks/extraction_bench.py  -> results/extraction.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe import TrainConfig, fhe, train
from fedfhe.data import Dataset, load_dataset
from fedfhe.fhe import CompiledModel
from fedfhe.model import LinearModel
from fedfhe.service.server import Limits

HERE = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / "fedfhe-extraction-bench"
DATASETS = ("breast-cancer", "mnist-5k")
CONFIG = TrainConfig(clients=5, rounds=3, seed=0)
N_BITS = 8
BUDGETS = (40, 100, 300, 1_000, 3_000, 10_000)
SIMULATE_ROWS = 1_000  # rows per simulation call: bounds memory, whatever the circuit
RATE = 60.0  # fedfhe serve --rate: requests per minute per token, a bucket that starts full
SETUP_REQUESTS = 3  # GET /v1/model, GET /v1/client-spec, POST /v1/keys: rate-limited like predictions
WORKERS = 2  # fedfhe serve --workers default: a batch is spread over them
FHE_ROWS = 3  # rows run in real FHE to time the server and size a ciphertext

Oracle = Callable[[np.ndarray], np.ndarray]


def trained(name: str, data: Dataset) -> tuple[LinearModel, Path]:
    """fedfhe's federated model of a data set, trained once per config and then read from the cache."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(CONFIG), sort_keys=True).encode()).hexdigest()[:12]
    run = CACHE / f"{name}-{digest}"
    if (run / "model.npz").is_file():
        return LinearModel.load(run / "model.npz"), run
    return train(data, CONFIG, run, force=True), run


def served(model: LinearModel, mode: str, scores_circuit: CompiledModel) -> CompiledModel:
    """The circuit a client of this mode queries: the label-only one, or the scores one."""
    return fhe.compile_model(model, N_BITS, outputs="label") if mode == "label" else scores_circuit


def in_batches(oracle: Oracle, X: np.ndarray) -> np.ndarray:
    """The oracle's answers for many rows, simulated SIMULATE_ROWS at a time."""
    return np.concatenate([oracle(X[i : i + SIMULATE_ROWS]) for i in range(0, len(X), SIMULATE_ROWS)])


def score_oracle(compiled: CompiledModel) -> Oracle:
    """What a scores client decrypts: the quantized model's dequantized scores (one column for two classes)."""
    return lambda X: np.asarray(compiled.concrete.decision_function(compiled.source.scale(X), fhe="simulate"))


def label_oracle(compiled: CompiledModel) -> Oracle:
    """What a label client decrypts: the predicted class of each row."""
    return lambda X: compiled.predict(X, fhe="simulate")


def to_labels(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Classes from scores as fhe.CompiledModel.classify picks them: sign of one column, else the largest."""
    return classes[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)]


def told(mode: str, answers: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The classes a client learns: picked from its decrypted scores, or given as they are."""
    return to_labels(answers, classes) if mode == "scores" else answers


def solve_equations(model: LinearModel, X: np.ndarray, scores: np.ndarray) -> Oracle:
    """Tramer et al.'s equation solving on the public [0, 1] scaling (input ranges and classes are served)."""

    def design(rows: np.ndarray) -> np.ndarray:
        return np.column_stack([model.scale(rows), np.ones(len(rows))])

    weights = np.linalg.lstsq(design(X), scores, rcond=None)[0]  # minimum norm while queries < unknowns
    return lambda rows: to_labels(design(rows) @ weights, model.classes)


def learn_labels(X: np.ndarray, labels: np.ndarray) -> Oracle:
    """A scikit-learn logistic regression (defaults, standardized inputs) on the answered labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(labels)) < 2:  # every answer was one class: that is all the copy can say
        return lambda rows: np.full(len(rows), labels[0])
    with fhe.quiet():  # scikit-learn passes L-BFGS options SciPy deprecates: a notice per fit
        copy = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1_000)).fit(X, labels)
    return copy.predict


def queries(model: LinearModel, data: Dataset) -> dict[str, np.ndarray]:
    """The attacker's rows in the order it spends them; each budget takes a prefix."""
    rng = np.random.default_rng(0)
    low, high = model.input_range
    return {
        "uniform": rng.uniform(low, high, size=(max(BUDGETS), model.n_features)),
        "population": data.X_train[rng.permutation(len(data.X_train))],
    }


def fhe_costs(compiled: CompiledModel, where: Path, X: np.ndarray) -> dict[str, float]:
    """Real FHE through the exported artifacts the service loads: per-row times and the ciphertext sent."""
    where.mkdir(parents=True, exist_ok=True)
    _, timings = fhe.execute(fhe.export(compiled, where), compiled, X[:FHE_ROWS])
    keep = ("keygen", "encrypt_per_sample", "server_run_per_sample", "input_ciphertext_bytes")
    return {k: timings[k] for k in keep}


def attacker_time(n_queries: int, costs: dict[str, float]) -> dict[str, float]:
    """Requests, the token bucket's wait at RATE and the server's FHE seconds for n_queries rows."""
    limits = Limits()
    per_request = min(limits.max_batch, limits.max_body_bytes // int(costs["input_ciphertext_bytes"]))
    requests = SETUP_REQUESTS + math.ceil(n_queries / per_request)
    return {
        "rows_per_request": per_request,
        "requests": requests,
        "rate_wait_s": max(0.0, requests - RATE) * 60 / RATE,
        "server_fhe_s": n_queries * costs["server_run_per_sample"] / WORKERS,
        "client_encrypt_s": n_queries * costs["encrypt_per_sample"],
    }


def attack(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every attack, source and budget on one data set's model, in both modes."""
    data = load_dataset(name, seed=0)
    model, run = trained(name, data)
    pools = queries(model, data)
    scores_circuit = fhe.compile_model(model, N_BITS)
    facts: dict[str, Any] = {"population_rows": len(pools["population"]), "test_rows": len(data.X_test), "modes": {}}
    rows, served_labels = [], {}
    for mode in ("scores", "label"):
        compiled = served(model, mode, scores_circuit)
        start = time.perf_counter()
        oracle = score_oracle(compiled) if mode == "scores" else label_oracle(compiled)
        answers = {source: in_batches(oracle, X) for source, X in pools.items()}
        reference = told(mode, in_batches(oracle, data.X_test), model.classes)
        simulated = {
            "simulate_s": time.perf_counter() - start,
            "simulated_rows": sum(map(len, pools.values())) + len(data.X_test),
        }
        costs = fhe_costs(compiled, run / f"served-{mode}", data.X_test)
        accuracy = float(np.mean(reference == data.y_test))
        facts["modes"][mode] = {**simulated, "served_accuracy": accuracy, "real_fhe": costs}
        served_labels[mode] = reference
        for source, X in pools.items():
            for n in sorted({min(q, len(X)) for q in BUDGETS}):
                said = answers[source][:n]
                copies = {"logistic": learn_labels(X[:n], told(mode, said, model.classes))}
                if mode == "scores":
                    copies = {"equations": solve_equations(model, X[:n], said), **copies}
                for attack_name, copy in copies.items():
                    predicted = copy(data.X_test)
                    rows.append(
                        {
                            "dataset": name,
                            "mode": mode,
                            "attack": attack_name,
                            "source": source,
                            "queries": n,
                            "agreement": float(np.mean(predicted == reference)),
                            "copy_accuracy": float(np.mean(predicted == data.y_test)),
                            **attacker_time(n, costs),
                        }
                    )
    # the label circuit rounds before it compares: a near-tie may get another class than the scores' argmax
    facts["label_vs_scores_on_test"] = float(np.mean(served_labels["label"] == served_labels["scores"]))
    return facts, rows


def table(rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    """Agreement (copy accuracy) per budget, then the attacker's time per budget, as Markdown."""
    head = " | ".join(f"{q:,}" for q in BUDGETS)
    lines = [f"| data set | mode | attack | source | {head} |", "|---" * (4 + len(BUDGETS)) + "|"]
    cases = dict.fromkeys((r["dataset"], r["mode"], r["attack"], r["source"]) for r in rows)
    for case in cases:
        found = {r["queries"]: r for r in rows if (r["dataset"], r["mode"], r["attack"], r["source"]) == case}
        cells = []
        for q in BUDGETS:
            r = found.get(q) or found[max(found)]  # a source smaller than the budget: all its rows
            mark = "" if r["queries"] == q else f" [all {r['queries']}]"
            cells.append(f"{r['agreement']:.3f} ({r['copy_accuracy']:.3f}){mark}")
        lines.append(f"| {' | '.join(case)} | {' | '.join(cells)} |")
    lines += ["", f"Requests / token-bucket wait at --rate {RATE:g} / server FHE ({WORKERS} workers), per budget:", ""]
    lines += [f"| data set | mode | {head} |", "|---" * (2 + len(BUDGETS)) + "|"]
    for name, found in facts.items():
        for mode, info in found["modes"].items():
            times = [attacker_time(q, info["real_fhe"]) for q in BUDGETS]
            cells = [f"{t['requests']} / {t['rate_wait_s']:.0f} s / {t['server_fhe_s']:.0f} s" for t in times]
            lines.append(f"| {name} | {mode} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    """Attack both data sets' models; write the JSON and print the tables."""
    start = time.perf_counter()
    facts: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name in DATASETS:
        facts[name], found = attack(name)
        rows += found
    result: dict[str, Any] = {
        "setup": {
            "training": dataclasses.asdict(CONFIG),
            "n_bits": N_BITS,
            "budgets": BUDGETS,
            "rate_per_minute": RATE,
            "setup_requests": SETUP_REQUESTS,
            "max_batch": Limits().max_batch,
            "max_body_bytes": Limits().max_body_bytes,
            "workers": WORKERS,
            "wall_s": time.perf_counter() - start,
        },
        "datasets": facts,
        "results": rows,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "extraction.json").write_text(json.dumps(result, indent=2))
    print(table(rows, facts))
    print(f"\nwall {result['setup']['wall_s']:.0f} s; label oracle: {result['setup']['label_oracle']}")


if __name__ == "__main__":
    main()
