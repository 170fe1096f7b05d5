"""The client's keys, encryption and decryption on `concrete.compiler` alone: a partner needs no torch.

Concrete's own client (`concrete.fhe`'s Client, ClientSpecs, Value) is a thin layer over the compiler's native
bindings, but importing `concrete.fhe` imports torch. The bindings do the whole job themselves: the keyset is
made from the client spec and kept in Concrete's keyset cache (a folder of the key directory named after the
spec's keys: secret keys, bootstrap and keyswitch keys), a quantized row is encrypted into the bytes the server
reads as a `fhe.Value`, the evaluation keys serialize as the server reads `fhe.EvaluationKeys`, and an output
decrypts to integers. Seeds of 0 draw fresh randomness from the system, so every key directory holds keys of its
own, loaded again from it on every later run (and by Concrete's client over the same folder).
"""

from __future__ import annotations

import json
import os

import numpy as np
from concrete.compiler import ClientProgram, Keyset, KeysetCache, ProgramInfo, TransportValue, Value

from fedfhe.errors import FedfheError
from fedfhe.native import native_quiet
from fedfhe.service.spec import SPECS, member


class CircuitKeys:
    """A client's keys for the one circuit of a client.zip, kept in `folder`: encrypts its input, decrypts its output."""

    def __init__(self, client_zip: bytes, folder: str | os.PathLike[str]) -> None:
        specs = member(client_zip, SPECS)
        try:
            info = ProgramInfo.deserialize(specs)
            (function,) = info.function_list()
            (circuit,) = (c for c in json.loads(specs)["circuits"] if c["name"] == function)
            (given,) = (value["typeInfo"]["lweCiphertext"] for value in circuit["inputs"])
            self.shape = tuple(int(d) for d in given["abstractShape"]["dimensions"])
            width, signed = int(given["encoding"]["integer"]["width"]), bool(given["encoding"]["integer"]["isSigned"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise FedfheError(f"the client spec holds no one-input circuit fedfhe encrypts for ({exc})") from None
        self.low, self.high = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
        with native_quiet():  # a first run's "KeySetCache: miss, regenerating"
            self._keyset = Keyset(info, KeysetCache(os.fspath(folder)))
        self._circuit = ClientProgram.create_encrypted(info, self._keyset).get_client_circuit(function)

    def evaluation_keys(self) -> bytes:
        """What the server needs to compute on this client's ciphertexts, serialized as it reads them."""
        return bytes(self._keyset.get_server_keys().serialize())

    def encrypt(self, row: np.ndarray) -> bytes:
        """One quantized row, encrypted and serialized; a row outside the circuit's input is refused, as Concrete's
        client refuses it (the native code would wrap its values around)."""
        value = np.ascontiguousarray(row, dtype=np.int64).reshape(1, -1)  # the bindings read memory in C order
        if value.shape != self.shape or value.min(initial=0) < self.low or value.max(initial=0) > self.high:
            raise FedfheError(
                f"a quantized row of shape {value.shape} does not fit the circuit's input: shape {self.shape}, "
                f"integers in [{self.low}, {self.high}]"
            )
        return bytes(self._circuit.prepare_input(Value(value), 0).serialize())

    def decrypt(self, output: bytes) -> np.ndarray:
        """The integers in one of the circuit's serialized outputs."""
        decrypted = self._circuit.process_output(TransportValue.deserialize(output), 0).to_py_val()
        return np.asarray(decrypted, dtype=np.int64)
