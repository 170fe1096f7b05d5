"""Locust users for benchmarks/soak_bench.py: closed-loop clients of `fedfhe serve`, each as fast as answers come.

The ciphertexts were encrypted once by soak_bench.py (a client's real keys, real test rows); the
users replay them, so the load is the server's, not the clients' encryption.
"""

from __future__ import annotations

import os
import random
import ssl
import struct
from pathlib import Path

from locust import FastHttpUser, constant, task

SOAK = Path(os.environ["SOAK_DIR"])
FRAMES = [p.read_bytes() for p in sorted(SOAK.glob("frame-*.bin"))]
KEY_ID = (SOAK / "key_id").read_text().strip()
HEADERS = {"authorization": f"Bearer {(SOAK / 'token').read_text().strip()}"}


def _verified() -> ssl.SSLContext:
    """HTTPS checked against the soak's private CA (SOAK_CA), as a real client would."""
    return ssl.create_default_context(cafile=os.environ["SOAK_CA"])


class Client(FastHttpUser):
    """Mostly predictions of one ciphertext; now and then the model facts and health."""

    wait_time = constant(0)
    if os.environ.get("SOAK_CA"):
        insecure = False
        ssl_context_factory = staticmethod(_verified)

    @task(20)
    def predict(self) -> None:
        body = random.choice(FRAMES)
        headers = {**HEADERS, "content-type": "application/octet-stream"}
        with self.client.post(
            f"/v1/predict?key_id={KEY_ID}", data=body, headers=headers, name="/v1/predict", catch_response=True
        ) as answer:
            if answer.status_code != 200:
                answer.failure(f"status {answer.status_code}")
            elif struct.unpack(">I", answer.content[:4])[0] != 1:
                answer.failure("not one encrypted output")

    @task(1)
    def model(self) -> None:
        self.client.get("/v1/model", headers=HEADERS)

    @task(1)
    def health(self) -> None:
        self.client.get("/v1/health")
