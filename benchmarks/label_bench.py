"""Label-only outputs against scores outputs: agreement, accuracy, server time, key and ciphertext sizes.

For each case (data set, classifier, split) one federated model is compiled both ways and evaluated
on the whole test split in FHE simulation and on the first rows in real FHE (keygen, encrypt, run,
decrypt through the exported artifacts). Where the label circuit's class differs from the clear
quantized model's, the gap between the two classes' scores is recorded in logits: near-ties only.
Usage: .venv/bin/python benchmarks/label_bench.py  -> results/label.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedfhe import TrainConfig, fhe, train
from fedfhe.data import load_dataset

HERE = Path(__file__).resolve().parent
REAL_ROWS = 10
CASES = [  # (data set, model, partitioning): Dirichlet 0.5 is the skewed split owners really have
    ("breast-cancer", "logistic", "iid"),
    ("breast-cancer", "svm", "iid"),
    ("mnist-5k", "logistic", "iid"),
    ("mnist-5k", "svm", "iid"),
    ("mnist-5k", "logistic", "dirichlet"),
]


def measure(name: str, kind: str, partitioning: str, folder: Path) -> dict[str, Any]:
    """Both output modes of one trained model, on the same rows."""
    data = load_dataset(name, seed=0)
    config = TrainConfig(clients=5, rounds=3, model=kind, partitioning=partitioning, alpha=0.5, seed=0)
    model = train(data, config, folder / "run", force=True)
    case: dict[str, Any] = {"dataset": name, "model": kind, "partitioning": partitioning, "test_rows": len(data.y_test)}
    for outputs in fhe.OUTPUTS:
        compiled = fhe.compile_model(model, 8, outputs=outputs)
        (folder / outputs).mkdir()
        artifacts = fhe.export(compiled, folder / outputs)
        evaluation = fhe.evaluate(compiled, data.X_test, data.y_test, REAL_ROWS, artifacts)
        timing = evaluation["timing_s"]
        case[outputs] = {
            "accuracy_simulate": evaluation["accuracy"]["fhe_simulate"],
            "accuracy_execute": evaluation["accuracy"]["fhe_execute"],
            "agreement_with_clear": evaluation["agreement"]["fhe_vs_clear"],
            "execute_vs_simulate": evaluation["agreement"]["execute_vs_simulate"],
            "bootstraps": compiled.info()["bootstraps"],
            "max_bit_width": compiled.max_bit_width,
            "compile_s": compiled.compile_seconds,
            "keygen_s": timing["keygen"],
            "server_ms_per_row": 1000 * timing["server_run_per_sample"],
            "encrypt_ms_per_row": 1000 * timing["encrypt_per_sample"],
            "evaluation_key_bytes": timing["evaluation_key_bytes"],
            "input_ciphertext_bytes": timing["input_ciphertext_bytes"],
            "output_ciphertext_bytes": timing["output_ciphertext_bytes"],
        }
        if outputs == "label":
            case[outputs]["flips"] = flips(compiled, data.X_test, np.array(evaluation["predictions"]["fhe_simulate"]))
    case["accuracy_points_lost"] = 100 * (case["scores"]["accuracy_simulate"] - case["label"]["accuracy_simulate"])
    return case


def flips(compiled: fhe.CompiledModel, X: np.ndarray, picked: np.ndarray) -> dict[str, Any]:
    """Rows whose label differs from the exact one, and the score gap (logits) between the two classes."""
    rule = compiled.rule
    assert rule is not None
    q = compiled.concrete.quantize_input(compiled.source.scale(X))
    index = np.searchsorted(np.asarray(compiled.concrete.classes_), picked)
    wrong = index != rule.clear(q)
    gaps = rule.shortfall(q, index)
    unit = float(np.ravel(compiled.concrete.output_quantizers[0].scale)[0])  # logits per integer step
    return {
        "rows": int(wrong.sum()),
        "rate": float(wrong.mean()),
        "max_gap_logit": float(unit * gaps[wrong].max()) if wrong.any() else None,
        "finest_step_logit": unit * 2**rule.second,
    }


def main() -> None:
    """Every case, printed as it finishes, then written to results/label.json."""
    cases = []
    for name, kind, partitioning in CASES:
        with tempfile.TemporaryDirectory(prefix="fedfhe-label-") as tmp:
            cases.append(measure(name, kind, partitioning, Path(tmp)))
        label, scores = cases[-1]["label"], cases[-1]["scores"]
        print(
            f"{name} {kind} {partitioning}: label agreement {label['agreement_with_clear']:.4f}, accuracy "
            f"{label['accuracy_simulate']:.4f} vs {scores['accuracy_simulate']:.4f}, server "
            f"{label['server_ms_per_row']:.0f} vs {scores['server_ms_per_row']:.0f} ms/row, keys "
            f"{label['evaluation_key_bytes'] / 1e6:.1f} MB",
            file=sys.stderr,
        )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "label.json").write_text(json.dumps({"real_fhe_rows": REAL_ROWS, "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
