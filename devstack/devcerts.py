"""Development and test certificates: a private CA and the leaves it signs (needs the dev extra `cryptography`)."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["COMPOSE_NAMES", "Issued", "issue", "make_ca", "write_compose_set"]

# Every name a process in compose.yaml is reached by, plus the one TLS_SERVER_NAME checks.
COMPOSE_NAMES = (
    "sagasuite.internal",
    "localhost",
    "127.0.0.1",
    "orchestrator",
    "inventory",
    "payment",
    "shipping",
    "notify",
)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.pem` and `<stem>-key.pem` (the key readable by its owner only)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def make_ca(common_name: str = "sagasuite development CA", days: int = 365) -> Issued:
    """A self-signed CA that may sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Issued(_validity(builder, days).sign(key, hashes.SHA256()), key)


def issue(ca: Issued, common_name: str, names: Iterable[str] = (), days: int = 365) -> Issued:
    """A leaf certificate for servers and clients alike; `names` become DNS or IP subject alternative names."""
    key = ec.generate_private_key(ec.SECP256R1())
    alternative: list[x509.GeneralName] = []
    for name in names or (common_name,):
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    return Issued(_validity(builder, days).sign(ca.key, hashes.SHA256()), key)


def write_compose_set(directory: Path, days: int = 365) -> list[Path]:
    """The files compose.tls.yaml mounts: ca.pem, internal.pem/-key.pem (every process) and consul.pem/-key.pem."""
    ca = make_ca(days=days)
    ca_cert, ca_key = ca.write(directory, "ca")
    written = [ca_cert, ca_key]
    written += issue(ca, "sagasuite.internal", COMPOSE_NAMES, days).write(directory, "internal")
    written += issue(ca, "consul", ("consul", "localhost", "127.0.0.1"), days).write(directory, "consul")
    # The containers run as other users than the one who made the files: they must read their keys
    # (development only; the CA's key stays private).
    for path in written[2:]:
        path.chmod(0o644)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.devcerts",
        description="Write a development CA and the certificates compose.tls.yaml expects. Not for production.",
    )
    parser.add_argument("directory", nargs="?", default="deploy/certs", type=Path)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    for path in write_compose_set(args.directory, args.days):
        print(path)


if __name__ == "__main__":
    main()
