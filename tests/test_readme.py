"""The README, docs/ and deploy/ are a contract: every fedfhe command they show exists with every option it uses."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("federation", "flower", "schema")  # commands with subcommands


def shown_commands() -> list[tuple[str, str]]:
    """(file, line) for every `fedfhe ...` line inside a bash block of the README or docs/."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL):
            joined = block.replace("\\\n", " ")  # continued lines are one command
            found += [(path.name, line.strip()) for line in joined.splitlines() if line.strip().startswith("fedfhe ")]
    return found + deployed_commands()


def deployed_commands() -> list[tuple[str, str]]:
    """The `fedfhe serve` the Dockerfile starts and the one each Kubernetes container runs."""
    import json

    import yaml

    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "deploy" / "Dockerfile").read_text(), re.MULTILINE)
    assert cmd, "deploy/Dockerfile has no CMD"
    found = [("Dockerfile", "fedfhe " + " ".join(json.loads(cmd.group(1))))]
    for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()):
        if doc["kind"] == "Deployment":
            found += [
                ("kubernetes.yaml", "fedfhe " + " ".join(c["args"]))
                for c in doc["spec"]["template"]["spec"]["containers"]
            ]
    assert len(found) == 2
    return found


@functools.cache
def help_of(command: tuple[str, ...]) -> str:
    """A command's --help, wide enough that no option name is cut (rich reads COLUMNS as it draws it)."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"
    try:
        done = cli(*command, "--help")
    finally:
        os.environ.pop("COLUMNS")
        if columns is not None:
            os.environ["COLUMNS"] = columns
    assert done.returncode == 0, f"fedfhe {' '.join(command)}: {done.stderr[-300:]}"
    return done.stdout


@pytest.mark.parametrize(("where", "line"), shown_commands())
def test_every_documented_command_and_option_exists(where, line):
    words = line.split("  #")[0].split()[1:]
    command = tuple(words[:2]) if words[0] in GROUPS else (words[0],)
    shown = help_of(command)
    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line.split("  #")[0]):
        assert re.search(rf"{re.escape(flag)}(?![\w-])", shown), f"{where}: `fedfhe {' '.join(command)}` has no {flag}"


def test_the_check_can_fail():
    shown = help_of(("run",))
    assert re.search(r"--positive-class(?![\w-])", shown) and not re.search(r"--positive(?![\w-])", shown)
    assert len(shown_commands()) > 40  # the README's and docs' commands were all found
