"""Evaluation keys and client specs as untrusted bytes: a keyset's structure read without a schema, weak specs refused."""

from __future__ import annotations

import io
import json
import re
import time
import zipfile

import numpy as np
import pytest

from fedfhe.errors import FedfheError
from fedfhe.service.keyset import Malformed, counts, layout
from fedfhe.service.processing import read_quantizers
from fedfhe.service.spec import WeakSpec, check_spec, min_variance


def message(*words: int) -> bytes:
    """A one-segment Cap'n Proto message holding these 64-bit words."""
    return (
        (0).to_bytes(4, "little") + len(words).to_bytes(4, "little") + b"".join(w.to_bytes(8, "little") for w in words)
    )


def struct_pointer(offset: int, data: int, pointers: int) -> int:
    return ((offset & 0x3FFFFFFF) << 2) | (data << 32) | (pointers << 48)


def list_pointer(offset: int, size: int, count: int) -> int:
    return 1 | ((offset & 0x3FFFFFFF) << 2) | (size << 32) | (count << 35)


def keyed(parameter: int, payload: bytes) -> bytes:
    """A struct with one data word (a key's parameter) and one pointer to a byte list (its key material)."""
    words = (len(payload) + 7) // 8
    body = payload.ljust(words * 8, b"\0")
    chunks = [int.from_bytes(body[i : i + 8], "little") for i in range(0, len(body), 8)]
    return message(struct_pointer(0, 1, 1), parameter, list_pointer(0, 2, len(payload)), *chunks)


def test_a_layout_holds_parameters_and_sizes_never_key_material():
    assert (
        layout(keyed(42, b"a" * 20))
        == layout(keyed(42, b"b" * 20))
        == ("struct", (42).to_bytes(8, "little"), (("values", 8, 20),))
    )
    assert layout(keyed(42, b"a" * 20)) != layout(keyed(43, b"a" * 20))  # another parameter
    assert layout(keyed(42, b"a" * 20)) != layout(keyed(42, b"a" * 21))  # another size
    assert counts(layout(message(struct_pointer(0, 0, 3), 0, 0, 0))) == [0, 0, 0]  # a keyset without keys


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "too short"),
        (message(), "outside the message"),  # no root pointer
        ((5).to_bytes(4, "little") + b"\0" * 4, "truncated segment table"),
        (message(struct_pointer(0, 1, 1)) + b"\0" * 8, "segments of"),
        (message(struct_pointer(5, 1, 0), 0), "outside the message"),
        (message(3), "capability"),
        (message(0), "an empty message"),
        (message(list_pointer(-1, 6, 1)), "nested over"),  # a list of one pointer: itself
        (message(2), "nested over"),  # a far pointer whose landing pad is itself
        (message(list_pointer(0, 7, 1), (2 << 2) | (1 << 32), 0), "larger than its words"),
        (message(list_pointer(0, 7, 0), (1 << 29) << 2), "revisit"),  # 2^29 structs of no size
    ],
)
def test_malformed_messages_are_refused_quickly(data, problem):
    start = time.perf_counter()
    with pytest.raises(Malformed, match=problem):
        layout(data)
    assert time.perf_counter() - start < 1


def test_a_million_empty_structs_cost_their_steps():
    with pytest.raises(Malformed, match="revisit"):  # a list of 2^20 zero-size structs in a 3-word message
        layout(message(list_pointer(0, 7, 0), (1 << 20) << 2))


# A label circuit's spec as Concrete 2.10 compiles it here (breast-cancer): the parameters that matter.
SECURE = {
    "keyset": {
        "lweSecretKeys": [
            {"id": 0, "params": {"lweDimension": 2048, "integerPrecision": 64, "keyType": "binary"}},
            {"id": 1, "params": {"lweDimension": 801, "integerPrecision": 64, "keyType": "binary"}},
        ],
        "lweBootstrapKeys": [
            {
                "id": 0,
                "inputId": 1,
                "outputId": 0,
                "params": {"glweDimension": 1, "polynomialSize": 2048, "variance": 8.442253112932959e-31},
            }
        ],
        "lweKeyswitchKeys": [
            {
                "id": 0,
                "inputId": 0,
                "outputId": 1,
                "params": {"variance": 1.6550012343754573e-11, "outputLweDimension": 801},
            }
        ],
        "packingKeyswitchKeys": [],
    },
    "circuits": [
        {
            "inputs": [
                {
                    "typeInfo": {
                        "lweCiphertext": {
                            "encryption": {"keyId": 0, "variance": 8.442253112932959e-31, "lweDimension": 2048},
                            "compression": "seed",
                        }
                    }
                }
            ]
        }
    ],
}


def zipped(specs: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("client.specs.json", json.dumps(specs))
    return buffer.getvalue()


def changed(path: str, value: object, original: dict = SECURE) -> dict:
    """A copy of `original` with one field replaced; `path` is dotted, numbers index lists."""
    specs = json.loads(json.dumps(original))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = specs
    for part in parents:
        node = node[part]
    node[last] = value
    return specs


def test_a_compiled_specs_parameters_pass_and_sit_above_the_curve():
    check_spec(zipped(SECURE), "here")
    assert 8.4e-31 / min_variance(2048) > 9 and 1.65e-11 / min_variance(801) > 2.8


@pytest.mark.parametrize(
    "path, value, problem",
    [
        ("keyset.lweSecretKeys.0.params.lweDimension", 1, "secret key 0 has dimension 1, under 450"),
        ("keyset.lweSecretKeys.1.params.keyType", "gaussian", "secret key 1 is not a binary key over 64 bits"),
        (
            "circuits.0.inputs.0.typeInfo.lweCiphertext.encryption.variance",
            0.0,
            "input 0 has noise variance 0 at dimension 2048",
        ),
        (
            "circuits.0.inputs.0.typeInfo.lweCiphertext.encryption.lweDimension",
            801,
            "input 0 is encrypted at dimension 801 under a key",
        ),
        ("circuits.0.inputs.0.typeInfo.lweCiphertext.compression", "none", "input 0 is not seed-compressed"),
        ("keyset.lweBootstrapKeys.0.params.variance", 1e-40, "bootstrap key 0 has noise variance 1e-40"),
        ("keyset.lweBootstrapKeys.0.params.polynomialSize", 512, "bootstrap key 0 is encrypted at dimension 512"),
        (
            "keyset.lweKeyswitchKeys.0.params.variance",
            1e-20,
            "keyswitch key 0 has noise variance 1e-20 at dimension 801",
        ),
        ("keyset.lweKeyswitchKeys.0.outputId", 7, "keyswitch key 0 is encrypted at dimension 801 under a key"),
        ("keyset.lweKeyswitchKeys.0.params.variance", float("nan"), "keyswitch key 0 has noise variance nan"),
        ("circuits", "nothing", "unreadable client spec"),
        (
            "circuits.0.inputs.0.typeInfo.lweCiphertext.encryption.modulus",
            {"modulus": {"integer": {"modulus": 65536}}},
            "input 0 is not over the native 64-bit modulus",
        ),
        ("keyset.lweSecretKeys.1.id", 0, "two secret keys share an id"),
    ],
)
def test_weak_or_unexpected_specs_are_refused_in_one_line(path, value, problem):
    with pytest.raises(WeakSpec, match=problem) as refused:
        check_spec(zipped(changed(path, value)), "https://server client spec")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("https://server client spec")


def test_what_is_not_a_spec_is_one_line():
    for data in (b"", b"PK\x03\x04junk", zipped({})):
        with pytest.raises(WeakSpec, match="unreadable client spec"):
            check_spec(data, "here")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("client.specs.json", b" " * (2 << 20))  # 2 MiB of blanks, 2 KB packed
    with pytest.raises(WeakSpec, match="unpacks to 2097152 bytes"):
        check_spec(buffer.getvalue(), "here")


def test_a_secure_spec_concrete_cannot_build_makes_no_key(tmp_path):
    from fedfhe.service.crypto import CircuitKeys

    check_spec(zipped(SECURE), "here")  # the parameters pass; the circuit behind them is missing
    with pytest.raises(FedfheError, match="the client spec holds no one-input circuit fedfhe encrypts for") as refused:
        CircuitKeys(zipped(SECURE), tmp_path / "keys")
    assert "\n" not in str(refused.value) and not (tmp_path / "keys").exists()


def test_a_second_spec_in_the_zip_is_refused():
    buffer = io.BytesIO()  # Concrete unpacks every entry: ./client.specs.json would replace the one checked
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("client.specs.json", json.dumps(SECURE))
        archive.writestr("./client.specs.json", json.dumps(changed("keyset.lweSecretKeys.0.params.lweDimension", 1)))
    with pytest.raises(WeakSpec, match="it holds client.specs.json more than once"):
        check_spec(buffer.getvalue(), "here")


def number(kind: str, value: object) -> dict:
    return {"type_name": kind, "serialized_value": value, "dtype": "int64" if kind != "numpy_float" else "float64"}


# A 6-bit model's serialized_processing.json as Concrete ML 1.9 writes it, with its model class left out.
PROCESSING = {
    "model_type": {"type_name": "type", "serialized_value": "00 not a skops archive: the client never decodes it"},
    "model_post_processing_params": {},
    "input_quantizers": [
        {
            "type_name": "UniformQuantizer",
            "serialized_value": {
                "n_bits": 6,
                "is_signed": True,
                "is_narrow": False,
                "scale": number("numpy_float", 1 / 63),
                "zero_point": number("numpy_integer", -32),
                "offset": 32,
                "no_clipping": False,
            },
        }
    ],
    "output_quantizers": [
        {
            "type_name": "UniformQuantizer",
            "serialized_value": {
                "scale": number("numpy_float", 0.01),
                "zero_point": number("numpy_array", [[100, -50]]),
            },
        }
    ],
}


def with_processing(processing: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("client.specs.json", json.dumps(SECURE))
        archive.writestr("serialized_processing.json", json.dumps(processing))
    return buffer.getvalue()


def test_quantizers_are_read_as_numbers_and_used_as_concrete_ml_does():
    quantizers = read_quantizers(with_processing(PROCESSING), "here")
    assert quantizers.quantize(np.array([[0.0, 0.5, 1.0, -3.0, 7.0]])).tolist() == [[-32, 0, 31, -32, 31]]
    two = quantizers.scores(np.array([[300, 50]]), classifier=True)  # logits 2 and 1: softmax
    assert np.allclose(two, np.exp([2, 1]) / np.exp([2, 1]).sum())
    assert np.allclose(quantizers.scores(np.array([[300, 50]]), classifier=False), [[2, 1]])
    single = changed("output_quantizers.0.serialized_value.zero_point", number("numpy_array", [[0]]), PROCESSING)
    p = 1 / (1 + np.exp(-1.5))  # one logit of a binary classifier: [1 - p, p]
    assert np.allclose(read_quantizers(with_processing(single), "here").scores(np.array([[150]]), True), [[1 - p, p]])


@pytest.mark.parametrize(
    "path, value, problem",
    [
        ("input_quantizers.0.serialized_value.scale", number("numpy_float", float("nan")), "non-finite"),
        ("input_quantizers.0.serialized_value.scale", number("numpy_float", -1.0), "a quantizer scale of [-1.0]"),
        ("input_quantizers.0.serialized_value.n_bits", 40, "input quantizer of 40 bits"),
        ("input_quantizers.0.serialized_value.offset", 3, "with offset 3"),
        ("input_quantizers.0.serialized_value.no_clipping", True, "an input quantizer that does not clip"),
        ("input_quantizers.0.type_name", "SkopsObject", "not a UniformQuantizer"),
        ("input_quantizers.0.serialized_value.zero_point", {"type_name": "function", "x": 1}, "a number tagged"),
        ("output_quantizers", [], "not one input and one output quantizer"),
        ("output_quantizers.0.serialized_value.zero_point", [[[1]]], "zero points of an unexpected shape"),
    ],
)
def test_quantizers_that_are_not_a_linear_models_are_one_line(path, value, problem):
    with pytest.raises(FedfheError, match=re.escape(problem)) as refused:
        read_quantizers(with_processing(changed(path, value, PROCESSING)), "https://server client spec")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("https://server client spec")
