"""How the server talks to the nodes: replies collected promptly, and if asked, every reply kept for audit.

Flower 1.42's deployed grid (`HttpGrid.send_and_receive`) sleeps 3 s between pulls of replies; a
round whose replies are ready after 0.5 s still waits 3. The push and pull calls themselves are
public, so this grid pulls every POLL seconds instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

POLL = 0.1  # seconds between pulls of replies


class PromptGrid(Grid):
    """A grid that hands messages to another and collects the replies every POLL seconds."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        """As the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """As the wrapped grid."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """As the wrapped grid."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """As the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """As the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every POLL seconds until every reply is in or `timeout` has passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            if waiting and (deadline is None or time.monotonic() < deadline):
                time.sleep(POLL)
            elif waiting:
                break
        return replies


class AuditGrid(PromptGrid):
    """A prompt grid that also writes every reply it receives to a folder: what the server saw, for review.

    Each reply becomes reply-NNNNN.npz: its arrays (`array/RECORD/KEY`), its byte values
    (`bytes/RECORD/KEY/I`, e.g. SecAgg+'s masked vectors) and the rest of its configs and metrics as
    JSON (`header`), so a reviewer can check what arrived, e.g. that under SecAgg+ no update did.
    """

    def __init__(self, grid: Grid, folder: Path) -> None:
        super().__init__(grid)
        self.folder, self.count = folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull as the wrapped grid, keeping a copy of each reply."""
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            if not reply.has_error():
                self._keep(reply.content)
        return replies

    def _keep(self, content: RecordDict) -> None:
        """Write one reply's records."""
        kept: dict[str, np.ndarray] = {}
        plain: dict[str, Any] = {"metrics": {name: dict(r) for name, r in content.metric_records.items()}}
        for name, record in content.array_records.items():
            kept |= {f"array/{name}/{key}": np.asarray(array.numpy()) for key, array in record.items()}
        for name, config in content.config_records.items():
            for key, value in config.items():
                blobs: list[Any] = (
                    value if isinstance(value, list) and value and isinstance(value[0], bytes) else [value]
                )
                if isinstance(blobs[0], bytes):
                    kept |= {f"bytes/{name}/{key}/{i}": np.frombuffer(b, np.uint8) for i, b in enumerate(blobs)}
                else:
                    plain.setdefault("configs", {}).setdefault(name, {})[key] = value
        header = np.frombuffer(json.dumps(plain).encode(), np.uint8)
        np.savez(self.folder / f"reply-{self.count:05d}.npz", header=header, **kept)
        self.count += 1
