"""What import-linter cannot see: Ray, reached only through flwr.simulation, stays in the simulation module; the
encrypting client loads concrete.compiler, never concrete.fhe (which imports torch); the partner's install
(requirements-client.txt) holds everything the client path imports, and none of the heavy stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grimp
import numpy as np
import pandas as pd
from conftest import ENV, HEAVY
from partner_install.sitecustomize import LOCK, pins
from PIL import Image

from fedfhe.data import PYARROW


def test_only_the_simulation_module_reaches_ray():
    graph = grimp.build_graph("fedfhe", include_external_packages=True)
    assert "ray" not in graph.modules or graph.find_modules_that_directly_import("ray") == set()
    reaching = {
        importer
        for importer in graph.find_modules_that_directly_import("flwr")
        for detail in graph.get_import_details(importer=importer, imported="flwr")
        if "flwr.simulation" in detail["line_contents"]
    }
    assert reaching == {"fedfhe.federated.simulation"}


def test_the_flower_apps_and_training_load_without_ray_or_concrete():
    modules = ["fedfhe.training", "fedfhe.federated.server_app", "fedfhe.federated.client_app", "fedfhe.cli"]
    code = f"import sys; [__import__(m) for m in {modules}]; print(sorted({{'ray', 'concrete'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_partners_lock_pins_the_full_installs_versions_without_its_heavy_stack():
    """requirements-client.txt: constraints.txt's versions, none of torch, Concrete ML, Flower, Ray, scikit-learn."""
    lock, full = pins(LOCK), pins(LOCK.with_name("constraints.txt"))
    heavy = {"torch", "triton", "concrete-ml", "concrete-ml-extensions", "flwr", "flwr-datasets", "ray", "scikit-learn"}
    assert {name for name in lock if name in heavy | {"scipy", "pyarrow"} or name.startswith("nvidia-")} == set()
    assert {name: version for name, version in lock.items() if full.get(name, version) != version} == {}
    assert lock.keys() - full.keys() == {"setuptools"}  # pkg_resources, for concrete's namespace package
    assert PYARROW == f"pyarrow=={full['pyarrow']}"  # what `predict x.parquet` tells the partner to add


CLIENT_PATH = """
import json, sys
from pathlib import Path
import numpy as np
from fedfhe.cli import main
from fedfhe.errors import FedfheError
from fedfhe.service.client import read_inputs
from fedfhe.table import read_frame

for args in (["--help"], ["predict", "--help"]):
    sys.argv = ["fedfhe", *args]
    try:
        main()
    except SystemExit as done:
        assert done.code == 0, args
seen = {"csv": len(read_frame("rows.csv", 1 << 20)), "xlsx": len(read_frame("rows.xlsx", 1 << 20))}
for name in ("digit.png", "rows.npy"):
    seen[name] = read_inputs(Path(name), 64, (np.zeros(64), np.ones(64)), 1 << 20).shape
try:
    read_frame("rows.parquet", 1 << 20)
except FedfheError as exc:
    seen["parquet"] = str(exc)
for name in ("torch", "sklearn", "scipy", "flwr", "concrete.ml", "concrete.fhe", "concrete.compiler"):
    try:
        __import__(name)
        seen.setdefault("imported", []).append(name)
    except ModuleNotFoundError:
        pass
print(json.dumps(seen))
"""


def test_the_client_path_imports_only_what_the_partners_lock_installs(tmp_path):
    """`make client`'s venv emulated in this one (tests/partner_install): the CLI starts; tables, images and arrays are
    read; Parquet says how to add pyarrow; torch, scikit-learn, Flower and Concrete's frontend are missing."""
    frame = pd.DataFrame({"age": [50, 85], "ward": ["oncology", "cardiology"]})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_excel(tmp_path / "rows.xlsx", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    Image.new("L", (8, 8)).save(tmp_path / "digit.png")
    np.save(tmp_path / "rows.npy", np.zeros((3, 64)))
    path = [str(Path(__file__).parent / "partner_install"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_PATH], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: fedfhe [OPTIONS] COMMAND" in done.stdout and "Usage: fedfhe predict [OPTIONS] INPUT" in done.stdout
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "csv": 2,
        "xlsx": 2,
        "digit.png": [1, 64],
        "rows.npy": [3, 64],
        "parquet": f"rows.parquet: reading Parquet needs pyarrow, which this install lacks: pip install --no-deps {PYARROW}",
        "imported": ["concrete.compiler"],
    }


def test_the_encrypting_client_loads_concretes_compiler_alone():
    modules = ["fedfhe.cli", "fedfhe.service.client", "fedfhe.service.encryptor", "fedfhe.service.crypto"]
    watched = (*HEAVY, "concrete.compiler")
    code = f"import sys; [__import__(m) for m in {modules}]; print(sorted(m for m in {watched} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['concrete.compiler']"
