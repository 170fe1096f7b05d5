"""What import-linter cannot see: Ray, reached only through flwr.simulation, stays in the simulation module; the
encrypting client loads concrete.compiler, never concrete.fhe (which imports torch)."""

from __future__ import annotations

import subprocess
import sys

import grimp
from conftest import HEAVY


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


def test_the_encrypting_client_loads_concretes_compiler_alone():
    modules = ["fedfhe.cli", "fedfhe.service.client", "fedfhe.service.encryptor", "fedfhe.service.crypto"]
    watched = (*HEAVY, "concrete.compiler")
    code = f"import sys; [__import__(m) for m in {modules}]; print(sorted(m for m in {watched} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['concrete.compiler']"
