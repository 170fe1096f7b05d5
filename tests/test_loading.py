"""Hostile model files: refused from their sizes and headers, in bounded time and memory, in one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ENV, cli, fedfhe

from fedfhe.errors import FedfheError
from fedfhe.model import FORMAT, LinearModel

GOOD = {
    "coef": np.arange(12.0).reshape(3, 4),
    "intercept": np.zeros(3),
    "classes": np.arange(3),
    "input_low": np.zeros(4),
    "input_high": np.full(4, 16.0),
}


def npy(array: np.ndarray) -> bytes:
    """An array as the bytes of an .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], data: bytes = b"") -> bytes:
    """An .npy file declaring a float64 array of `shape`, followed by `data` whatever its length."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def write_model(
    path: Path,
    files: dict[str, bytes] | None = None,
    compression: int = zipfile.ZIP_STORED,
    **arrays: np.ndarray,
) -> Path:
    """A model file hashed the way `LinearModel.sha256` hashes, so only checks of its content can refuse it.

    `arrays` replace members of a small good model before hashing; `files` add or replace raw members after.
    """
    arrays = {**GOOD, **arrays}
    metadata = {"dataset": "x"}  # a training fact: not hashed (model.IDENTITY)
    digest = hashlib.sha256()
    for name in GOOD:
        digest.update(str((arrays[name].dtype.str, arrays[name].shape)).encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    digest.update(json.dumps(["logistic", {}], sort_keys=True).encode())
    header = {"format": FORMAT, "kind": "logistic", "metadata": metadata, "sha256": digest.hexdigest()}
    members = {f"{name}.npy": npy(array) for name, array in arrays.items()}
    members["header.npy"] = npy(np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    with zipfile.ZipFile(path, "w", compression=compression) as npz:
        for name, data in {**members, **(files or {})}.items():
            npz.writestr(name, data)
    return path


def corrupt_deflate(path: Path) -> Path:
    """A deflated model file whose coef data no longer inflates (0xff starts a block of the reserved type)."""
    write_model(path, compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as npz:
        offset = npz.getinfo("coef.npy").header_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        local = f.read(30)  # the local file header; the data follows its name and extra field
        f.seek(offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        f.write(b"\xff" * 16)
    return path


def repeat_member(path: Path) -> Path:
    """A model file with a second coef.npy after the first, which zipfile would read in its place."""
    write_model(path)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as npz:
        npz.writestr("coef.npy", npy(GOOD["coef"] * 2))
    return path


def sparse(path: Path) -> Path:
    """A 3 GiB file that takes no disk space."""
    path.touch()
    os.truncate(path, 3 << 30)
    return path


DEEP_JSON = b"[" * 200_000 + b"]" * 200_000
HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "inf weight": (lambda p: write_model(p, coef=np.where(GOOD["coef"] == 5, np.inf, GOOD["coef"])), "coef holds inf"),
    "NaN intercept": (lambda p: write_model(p, intercept=np.array([0.0, np.nan, 0.0])), "intercept holds inf or NaN"),
    "complex weights": (
        lambda p: write_model(p, coef=GOOD["coef"] + 1j),
        r"coef\.npy: complex128 of shape \(3, 4\), expected 2-D float64",
    ),
    "repeated classes": (lambda p: write_model(p, classes=np.array([0, 1, 1])), r"classes repeat: \[1\]"),
    "float classes": (lambda p: write_model(p, classes=np.arange(3.0)), r"classes\.npy: float64 of shape \(3,\)"),
    "infinite input range": (
        lambda p: write_model(p, input_high=np.array([16.0, np.inf, 16.0, 16.0])),
        "input range must be finite",
    ),
    "intercept of another shape": (
        lambda p: write_model(p, intercept=np.zeros(2)),
        r"intercept\.npy: float64 of shape \(2,\), expected float64 of shape \(3,\)",
    ),
    "unknown member": (lambda p: write_model(p, files={"extra.npy": npy(np.zeros(3))}), "unknown member 'extra.npy'"),
    "oversized member": (
        lambda p: write_model(p, files={"header.npy": npy(np.zeros(2 << 20, dtype=np.uint8))}),
        r"header\.npy unpacks to 2097280 bytes, more than",
    ),
    "huge declared shape": (
        lambda p: write_model(p, files={"coef.npy": npy_header((10**12, 1), bytes(8))}),
        r"coef\.npy: float64 of shape \(1000000000000, 1\), expected 2-D float64 of at most 1000 rows",
    ),
    "data shorter than declared": (
        lambda p: write_model(p, files={"coef.npy": npy_header((3, 4), bytes(8))}),
        "8 bytes of data where its header declares 96",
    ),
    "deep JSON header": (
        lambda p: write_model(p, files={"header.npy": npy(np.frombuffer(DEEP_JSON, dtype=np.uint8))}),
        "maximum recursion depth exceeded",
    ),
    "header not UTF-8": (
        lambda p: write_model(p, files={"header.npy": npy(np.frombuffer(b"\xff\xfe{", dtype=np.uint8))}),
        r"not a fedfhe model file \(.*decode",
    ),
    "header a JSON list": (
        lambda p: write_model(p, files={"header.npy": npy(np.frombuffer(b"[1]", dtype=np.uint8))}),
        "its header holds a JSON list, not an object",
    ),
    "corrupt deflate": (corrupt_deflate, r"Error -3 while decompressing data: invalid block type"),
    "bzip2 members": (
        lambda p: write_model(p, compression=zipfile.ZIP_BZIP2),
        r"\.npy is encrypted or compressed with method 12",
    ),
    "repeated member": (repeat_member, "a member name repeats"),
    "file of 3 GiB": (sparse, r"3221225472 bytes, more than \d+"),
}


def test_a_model_written_by_hand_loads_so_only_new_checks_refuse_the_hostile_ones(tmp_path):
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        model = LinearModel.load(write_model(tmp_path / "m.npz", compression=compression))
        assert np.array_equal(model.coef, GOOD["coef"]) and model.classes.tolist() == [0, 1, 2]


@pytest.mark.parametrize("version", [1, 2])  # 2: hashed the training facts too, so its sha256 is not this one's
def test_a_model_file_of_an_earlier_version_is_named_as_such(tmp_path, version):
    header = json.dumps({"format": f"fedfhe-linear-model/{version}", "metadata": {}, "sha256": "0" * 64}).encode()
    path = tmp_path / "m.npz"
    np.savez(
        path, coef=np.zeros((3, 4)), intercept=np.zeros(3), classes=np.arange(3), header=np.frombuffer(header, np.uint8)
    )
    found = f"format 'fedfhe-linear-model/{version}', expected {FORMAT}"
    with pytest.raises(FedfheError, match=f"not a fedfhe model file of this version .{found}.$"):
        LinearModel.load(path)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_model_files_are_refused_in_one_line(tmp_path, name):
    write, message = HOSTILE[name]
    path = write(tmp_path / "model.npz")
    with pytest.raises(FedfheError, match=message) as refused:
        LinearModel.load(path)
    assert str(refused.value).startswith(f"{path}: not a fedfhe model file (") and "\n" not in str(refused.value)


@pytest.mark.parametrize("name", HOSTILE)
def test_cli_refuses_hostile_model_files_in_one_line(tmp_path, name):
    HOSTILE[name][0](tmp_path / "model.npz")
    done = cli("compile", "--run", str(tmp_path))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "not a fedfhe model file" in done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr


def _bomb(folder: Path) -> None:
    folder.mkdir()
    path = write_model(folder / "model.npz")
    zeros = bytes(16 << 20)
    with (
        zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as npz,
        npz.open("extra.npy", "w", force_zip64=True) as member,
    ):
        for _ in range(3 << 6):  # 192 x 16 MiB = 3 GiB
            member.write(zeros)
    assert path.stat().st_size < 4 << 20


@pytest.fixture(scope="session")
def bomb(once) -> Path:
    """A 3 MB model file holding an extra member that deflates to 3 GiB of zeros."""
    return once("bomb", _bomb) / "model.npz"


LOAD_AND_MEASURE = """
import sys, time, tracemalloc
from fedfhe.errors import FedfheError
from fedfhe.model import LinearModel

def load():
    try:
        LinearModel.load(sys.argv[1])
    except FedfheError as exc:
        return str(exc)

start = time.perf_counter()
print(load())
print(time.perf_counter() - start)
tracemalloc.start()  # the peak of what loading allocates (numpy's buffers included), counted apart from the parent's
load()
print(tracemalloc.get_traced_memory()[1])
"""


def test_a_3_gib_member_is_refused_in_under_a_second_without_reading_it(bomb):
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(bomb)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=True,
    )
    message, seconds, peak_bytes = done.stdout.splitlines()
    assert "not a fedfhe model file (unknown member 'extra.npy')" in message
    assert float(seconds) < 1.0
    assert int(peak_bytes) < 1 << 20  # reading the member took 3.2 GB


def test_cli_refuses_a_3_gib_member_in_one_line(bomb, tmp_path):
    (tmp_path / "model.npz").write_bytes(bomb.read_bytes())
    done = fedfhe("compile", "--run", str(tmp_path), timeout=60)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "unknown member 'extra.npy'" in done.stderr and "Traceback" not in done.stderr
