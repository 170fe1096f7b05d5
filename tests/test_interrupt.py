"""Ctrl-C and SIGTERM during `fedfhe train` and `fedfhe run`: real processes, real signals.

Each ends within 10 s with exit code 130 or 143 and one line naming the last checkpoint, leaves no
process behind, and the run resumes (after refused commands that must not touch it) to the model of an
uninterrupted run, bit for bit. After a kill -9, Ray's processes end within 10 s too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ENV, FEDFHE, cli, wait_for

from fedfhe import TrainConfig, train
from fedfhe.model import LinearModel

pytestmark = [pytest.mark.federation]

ROUNDS = 4
ARGS = ["--dataset", "digits", "--clients", "3", "--rounds", str(ROUNDS), "--local-iters", "5", "--seed", "0"]
MARK = "FEDFHE_TEST_INTERRUPT"  # an environment variable every process started for one command inherits
RAY = {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}  # the agents keep neither mark nor path


@pytest.fixture(scope="session")
def whole(once, digits) -> LinearModel:
    """The same training as ARGS, never interrupted."""
    config = TrainConfig(clients=3, rounds=ROUNDS, local_iters=5, seed=0)
    return LinearModel.load(once("uninterrupted", lambda out: train(digits, config, out)) / "model.npz")


class Command:
    """`fedfhe ...` started in a session of its own, as a shell starts a foreground job."""

    def __init__(self, *args: str, out: Path) -> None:
        self.out, self.mark, self.started = out, uuid.uuid4().hex, time.time()
        self.sessions: set[int] = set()
        env = {name: value for name, value in ENV.items() if name != "RAY_ADDRESS"}  # Ray of its own, to end with it
        self.proc = subprocess.Popen(
            [*FEDFHE, *args, "--out", str(out)],
            env={**env, MARK: self.mark},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def processes(self) -> list[list[str]]:
        """Command lines of the live processes started for this command: marked, naming its run directory, or in
        the session of one that is (its sessions are remembered: their leaders may be dead by the next call)."""
        live = []
        for p in psutil.process_iter(["cmdline", "create_time", "status"]):
            try:
                if p.info["create_time"] < self.started - 1 or p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue  # older, or dead (this machine's init does not reap orphans)
                cmdline, session = p.info["cmdline"] or [], os.getsid(p.pid)
                if p.environ().get(MARK) == self.mark or str(self.out) in " ".join(cmdline):
                    self.sessions.add(session)
                live.append((session, cmdline))
            except (psutil.Error, ProcessLookupError):
                continue
        return [cmdline for session, cmdline in live if session in self.sessions]

    def stop(self, number: int, group: bool) -> tuple[float, list[str]]:
        """Send the signal (to the whole process group, as a terminal's Ctrl-C does); seconds to exit, stderr lines."""
        sent = time.monotonic()
        if group:
            os.killpg(self.proc.pid, number)
        else:
            self.proc.send_signal(number)
        _, stderr = self.proc.communicate(timeout=60)
        return time.monotonic() - sent, stderr.splitlines()


def last_round(out: Path) -> int:
    """The round of the run's last checkpoint."""
    return max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("round-*.npz"))


def interrupted(command: Command, number: int, group: bool) -> None:
    """After round 1, the signal ends the command in one line within 10 s, and every process it started."""
    checkpoint = command.out / "checkpoints" / "round-0001.npz"
    wait_for(checkpoint.exists, 120, "round 1's checkpoint")
    programs = {Path(cmdline[0]).name for cmdline in command.processes() if cmdline}
    assert RAY <= programs, "the check must find Ray's processes, or the last one proves nothing"
    seconds, lines = command.stop(number, group)
    assert command.proc.returncode == 128 + number and seconds < 10, (command.proc.returncode, seconds, lines)
    done = last_round(command.out)
    assert done < ROUNDS
    assert lines == [f"interrupted after round {done} of {ROUNDS}; resume with: fedfhe train --resume {command.out}"]
    wait_for(lambda: not command.processes(), 5, "every process of the command to end")


def test_ctrl_c_stops_train_in_one_line_then_refused_commands_keep_the_run_resumable(tmp_path, whole):
    out = tmp_path / "run"
    interrupted(Command("train", *ARGS, out=out), signal.SIGINT, group=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, message in [
        (["train", *ARGS, "--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
        (["train", *ARGS, "--clients", "1400", "--partitioning", "dirichlet", "--alpha", "0.001"], "cannot partition"),
        (["train", *ARGS], f"{out} already holds a run: pass --force to start over"),
        (["run", *ARGS], f"or continue it with: fedfhe train --resume {out}"),
    ]:
        done = cli(*args, "--out", str(out))
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (args, done.stderr)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    resumed = cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    model = LinearModel.load(out / "model.npz")
    assert np.array_equal(model.coef, whole.coef) and np.array_equal(model.intercept, whole.intercept)


def test_sigterm_stops_run_in_one_line_and_the_run_resumes_to_the_same_model(tmp_path, whole):
    out = tmp_path / "run"
    interrupted(Command("run", *ARGS, "--fhe-samples", "1", out=out), signal.SIGTERM, group=False)
    assert not (out / "model.npz").exists() and not (out / "fhe").exists()
    resumed = cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    model = LinearModel.load(out / "model.npz")
    assert np.array_equal(model.coef, whole.coef) and np.array_equal(model.intercept, whole.intercept)


def test_ctrl_c_before_the_first_checkpoint(tmp_path):
    command = Command("train", *ARGS, out=tmp_path / "run")
    wait_for((tmp_path / "run" / "train_config.json").exists, 60, "the run to start")
    seconds, lines = command.stop(signal.SIGINT, group=True)
    assert (command.proc.returncode, lines) == (130, ["interrupted before the first checkpoint"]) and seconds < 10
    wait_for(lambda: not command.processes(), 5, "every process of the command to end")


def test_kill_9_of_train_takes_rays_processes_with_it_within_10_s(tmp_path):
    command = Command("train", *ARGS, out=tmp_path / "run")
    wait_for((command.out / "checkpoints" / "round-0001.npz").exists, 120, "round 1's checkpoint")
    names = lambda: {Path(cmdline[0]).name for cmdline in command.processes() if cmdline}
    wait_for(lambda: RAY <= names(), 30, "Ray's processes, its agents too (they start after the raylet)")
    command.proc.kill()
    command.proc.wait()
    wait_for(lambda: not command.processes(), 10, "every process of the killed command to end")  # Ray's agents: 62 s
    assert command.proc.communicate(timeout=10) == ("", "")  # nothing left behind to print a traceback
