"""Certificates and keys for a federation: a local CA, the SuperLink's TLS certificate, SuperNode identities,
the secret a SuperExec signs its Runtime API requests with.

For tests, demos and small federations; an organisation with its own PKI uses its own files
(docs/multi-host.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any


def _private_pem(key: Any) -> bytes:
    """PEM of an unencrypted private key; the files are written 0600."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_secret(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, from the moment the file exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as file:
        os.fchmod(fd, 0o600)  # a file that was there keeps its mode otherwise
        file.write(data)


def make_secret(path: str | os.PathLike[str]) -> Path:
    """32 random bytes (0600) shared by a SuperLink or SuperNode and its SuperExec: only they may claim tasks."""
    path = Path(path)
    _write_secret(path, secrets.token_bytes(32))
    return path


def make_certificates(
    folder: str | os.PathLike[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365
) -> Path:
    """A local CA (ca.crt) and a SuperLink certificate for `hosts` signed by it (server.pem/.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfhe local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(folder / "ca.key", _private_pem(ca_key))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(folder / "server.key", _private_pem(server_key))
    return folder


def make_node_key(folder: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """An EC key pair identifying one SuperNode: private key (OpenSSH PEM, 0600) and public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_secret(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public
