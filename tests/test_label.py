"""Label-only outputs: the circuit returns the class, agrees with the clear model, serves end to end on a real server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import answers_equal_concretes, cli, copy_of, evaluation_keys, fhe_client, serving, wait_for

from fedfhe import decision, fhe
from fedfhe.data import load_dataset
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel
from fedfhe.service.protocol import OCTET_STREAM, encode_frames

pytestmark = [pytest.mark.federation, pytest.mark.fhe]
OCTET = {"content-type": OCTET_STREAM}


@pytest.fixture(scope="session")
def label_run(once) -> Path:
    """breast-cancer, 3 clients, compiled with --outputs label and evaluated in real FHE on 5 rows; read-only."""

    def build(out: Path) -> None:
        done = cli("run", "--dataset", "breast-cancer", "--clients", "3", "--rounds", "2", "--outputs", "label",
                   "--fhe-samples", "5", "--run", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr

    return once("label-run", build)


def near_ties_only(compiled: fhe.CompiledModel, X: np.ndarray, picked: np.ndarray) -> None:
    """Where the circuit's class differs from the exact one, the two scores were within half the finest step."""
    rule = compiled.rule
    assert rule is not None
    q = compiled.concrete.quantize_input(compiled.inputs(X))
    index = np.searchsorted(np.asarray(compiled.concrete.classes_), picked)
    wrong = index != rule.clear(q)
    gaps = rule.shortfall(q, index)
    assert (gaps[wrong] < 2 ** (rule.second - 1)).all(), (gaps[wrong], 2**rule.second)


def test_ten_classes_the_rule_is_concrete_mls_and_the_circuit_computes_it(federated_run, digits):
    model = LinearModel.load(federated_run / "model.npz")
    compiled = fhe.compile_model(model, 8, outputs="label")
    assert compiled.outputs == "label" and compiled.info()["bootstraps"] == 2 * 45 + 10  # two roundings a pair
    q = compiled.concrete.quantize_input(compiled.inputs(digits.X_test))
    clear = compiled.predict(digits.X_test, fhe="disable")  # Concrete ML's clear quantized model
    assert compiled.rule is not None
    assert np.array_equal(np.asarray(compiled.concrete.classes_)[compiled.rule.clear(q)], clear)
    simulated = compiled.predict(digits.X_test, fhe="simulate")
    assert np.mean(simulated == clear) >= 0.99
    near_ties_only(compiled, digits.X_test, simulated)
    low, high = model.input_range  # anywhere in the declared box, not only real digits
    box = np.random.default_rng(0).uniform(low, high, (150, model.n_features))
    near_ties_only(compiled, box, compiled.predict(box, fhe="simulate"))


def test_two_classes_agree_in_simulation_and_real_fhe(label_run):
    report = json.loads((label_run / "report.json").read_text())
    assert report["outputs"] == "label" and report["circuit"]["bootstraps"] == 2
    assert report["agreement"]["fhe_vs_clear"] == report["agreement"]["execute_vs_clear"] == 1.0
    assert "auc" not in report["metrics"] and "sensitivity" in report["metrics"]  # no scores, so no ROC
    assert report["bytes"]["evaluation_key_bytes"] > 16 << 20  # bootstrapping keys: over the body limit
    assert "label outputs: the circuit returns the class only" in (label_run / "report.md").read_text()
    model = LinearModel.load(label_run / "model.npz")
    compiled = fhe.load_compiled(label_run, model)
    box = np.random.default_rng(1).uniform(*model.input_range, (200, model.n_features))
    near_ties_only(compiled, box, compiled.predict(box, fhe="simulate"))


@pytest.mark.parametrize("threshold", [0.1, 0.9])
def test_an_operating_point_is_compiled_into_the_label_circuit(label_run, threshold):
    model = LinearModel.load(label_run / "model.npz")
    split = load_dataset("breast-cancer", seed=0)
    X, y = split.X_test, split.y_test
    moved = decision.apply(model, decision.Rule("threshold", threshold), X, y, 0, "given", "given")  # 0: malignant
    compiled = fhe.compile_model(moved, 8, outputs="label")
    assert compiled.rule is not None and compiled.rule.cut != 1
    q = compiled.concrete.quantize_input(compiled.inputs(X))
    clear = compiled.predict(X, fhe="disable")  # Concrete ML's clear quantized scores, decided at the point
    assert np.array_equal(np.asarray(compiled.concrete.classes_)[compiled.rule.clear(q)], clear)
    assert not np.array_equal(clear, fhe.compile_model(model, 8).predict(X, fhe="disable"))  # the point moved some
    near_ties_only(compiled, X, compiled.predict(X, fhe="simulate"))
    box = np.random.default_rng(2).uniform(*model.input_range, (100, model.n_features))
    near_ties_only(compiled, box, compiled.predict(box, fhe="simulate"))


def test_a_real_server_sends_classes_only(label_run, served_run, tmp_path):
    split = load_dataset("breast-cancer", seed=0)
    np.save(tmp_path / "rows.npy", split.X_test[:6])
    model = LinearModel.load(label_run / "model.npz")
    compiled = fhe.load_compiled(label_run, model)
    expected = compiled.predict(split.X_test[:6], fhe="simulate")
    with serving(label_run, tmp_path / "store", tmp_path / "server.log", "--workers", "1") as served:
        info = httpx.get(f"{served.url}/v1/model").json()
        assert info["outputs"] == "label" and info["max_key_bytes"] == 128 << 20
        done = cli("predict", str(tmp_path / "rows.npy"), "--server", served.url, "--key-dir",
                   str(tmp_path / "keys"), "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers = json.loads(done.stdout)
        assert [a["class"] for a in answers] == expected.tolist()
        assert all("scores" not in a for a in answers) and {a["name"] for a in answers} <= {"malignant", "benign"}
        shown = cli("predict", str(tmp_path / "rows.npy"), "--server", served.url, "--key-dir", str(tmp_path / "keys"))
        assert "label outputs: the server returns classes only" in shown.stdout
        answers_equal_concretes(served.url, tmp_path / "keys", split.X_test[:2])
        # A scores-mode client's keys (no bootstrap or keyswitch key) would abort a label circuit: refused.
        foreign = evaluation_keys(served_run)
        refused = httpx.post(f"{served.url}/v1/keys", content=foreign, headers=OCTET, timeout=60)
        assert refused.status_code == 400, refused.text
        needs = "evaluation keys for another circuit: this one needs 1 bootstrap, 1 keyswitch, 0 packing keyswitch keys"
        assert refused.json()["detail"].startswith(needs) and httpx.get(f"{served.url}/v1/health").json()["keys"] == 1
        # Planted in the store all the same (as a server before this check accepted them), they crash the workers:
        # the request is tried again with the pool to itself, then the key id is refused, not the other clients.
        planted = hashlib.sha256(foreign).hexdigest()
        (tmp_path / "store" / f"{planted}.key").write_bytes(foreign)
        row = fhe_client(tmp_path / "keys").quantize_encrypt_serialize(compiled.inputs(split.X_test[:1]))
        frames = {"content": encode_frames([row]), "headers": OCTET, "params": {"key_id": planted}, "timeout": 120}
        crashed = httpx.post(f"{served.url}/v1/predict", **frames)
        assert crashed.status_code == 400 and "crashed the FHE workers twice" in crashed.json()["detail"]
        again = httpx.post(f"{served.url}/v1/predict", **frames)
        assert again.status_code == 400 and "crashed the FHE workers;" in again.json()["detail"]
        wait_for(lambda: httpx.get(f"{served.url}/v1/health").json()["status"] == "ok", 120, "the workers back")
        done = cli("predict", str(tmp_path / "rows.npy"), "--server", served.url, "--key-dir", str(tmp_path / "keys"),
                   "--json")  # fmt: skip
        assert done.returncode == 0 and [a["class"] for a in json.loads(done.stdout)] == expected.tolist()
    with serving(
        label_run, tmp_path / "small", tmp_path / "small.log", "--workers", "1", "--max-key-mb", "1"
    ) as served:
        done = cli("predict", str(tmp_path / "rows.npy"), "--server", served.url, "--key-dir", str(tmp_path / "k2"))
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "413" in done.stderr or "over the limit" in done.stderr
    carded = copy_of(label_run, tmp_path)  # the card is written into the run
    assert cli("card", "--run", str(carded)).returncode == 0
    card = json.loads((carded / "card.json").read_text())
    assert card["fhe"]["outputs"] == "label" and any("Label outputs" in limit for limit in card["limits"])
    assert card["evaluation"] is not None  # the report is of this very circuit


def test_bad_outputs_are_refused_and_the_mode_is_kept(label_run, tmp_path):
    label_run = copy_of(label_run, tmp_path)  # compiled and tuned again below
    done = cli("compile", "--run", str(label_run), "--outputs", "probs")
    assert done.returncode == 2 and "--outputs must be one of: scores, label (got 'probs')" in done.stderr
    out = tmp_path / "ridge"
    done = cli("run", "--dataset", "diabetes", "--model", "ridge", "--outputs", "label", "--run", str(out))
    assert done.returncode == 2 and "--outputs label applies to classifiers" in done.stderr and not out.exists()
    with pytest.raises(FedfheError, match="applies to classifiers"):
        fhe.check_outputs("label", regression=True)
    assert cli("compile", "--run", str(label_run), "--n-bits", "6/4").returncode == 0  # recompiled, still label
    info = json.loads((label_run / "fhe" / "fhe.json").read_text())
    assert (info["outputs"], info["n_bits"]) == ("label", {"op_inputs": 6, "op_weights": 4})
    done = cli("tune", "--run", str(label_run), "--n-bits", "6,8", "--latency-samples", "2", "--no-bit-pairs")
    assert done.returncode == 0, done.stderr
    points = json.loads((label_run / "tune.json").read_text())["points"]
    assert [p["outputs"] for p in points] == ["label", "label"] and min(p["key_bytes"] for p in points) > 1 << 20
    assert json.loads((label_run / "fhe" / "fhe.json").read_text())["outputs"] == "label"


def test_a_linear_svm_with_label_outputs_serves_too(tmp_path):
    out = tmp_path / "svm"
    done = cli("run", "--dataset", "breast-cancer", "--model", "svm", "--clients", "2", "--rounds", "2",
               "--outputs", "label", "--fhe-samples", "3", "--run", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == "label" and report["agreement"]["execute_vs_clear"] == 1.0
    split = load_dataset("breast-cancer", seed=0)
    np.save(tmp_path / "rows.npy", split.X_test[10:14])
    expected = fhe.load_compiled(out, LinearModel.load(out / "model.npz")).predict(split.X_test[10:14], fhe="simulate")
    with serving(out, tmp_path / "store", tmp_path / "server.log", "--workers", "1") as served:
        done = cli("predict", str(tmp_path / "rows.npy"), "--server", served.url, "--key-dir",
                   str(tmp_path / "keys"), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [a["class"] for a in json.loads(done.stdout)] == expected.tolist()
