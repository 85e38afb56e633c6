"""A repository served over https by the real repo-server app (uvicorn with TLS) under a
certificate from a private CA made for the test, as a site with its own CA runs it."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import free_port, stop, wait_accepting

SERVER = """
import sys
from pathlib import Path

import uvicorn

from repo_server.gateway import Gateway
from repo_server.leases import Leases
from repo_server.repository import LocalRepository
from repo_server.serve import create_app
from repo_server.tokens import TOKENS_FILE, TokenStore

root, keys, port, cert, key = sys.argv[1:]
repo = LocalRepository(Path(root), Path(keys))
gateway = Gateway(repo, TokenStore(Path(keys) / TOKENS_FILE), Leases())
uvicorn.run(
    create_app(repo.root, gateway=gateway), host="127.0.0.1", port=int(port),
    ssl_certfile=cert, ssl_keyfile=key, log_level="warning",
)
"""


@dataclass
class PrivateCA:
    ca_pem: Path  # what clients are given with --ca-bundle
    cert_pem: Path  # the server's certificate (127.0.0.1 and localhost)
    key_pem: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_private_ca(where: Path) -> PrivateCA:
    where.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test private CA"))
        .issuer_name(_name("test private CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    found = PrivateCA(where / "ca.pem", where / "server.pem", where / "server.key")
    found.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    found.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    found.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return found


@contextlib.contextmanager
def serving_tls(repo_dir: Path, keys: Path, ca: PrivateCA, log: Path) -> Iterator[str]:
    """The repository and its publish API on https://127.0.0.1:PORT for the block."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(repo_dir), str(keys), str(port),
             str(ca.cert_pem), str(ca.key_pem)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_accepting("the TLS repo-server", port, proc, log)
        yield f"https://127.0.0.1:{port}"
    finally:
        stop(proc)
