"""A private certificate authority for a fleet's broker: CA, server and client certificates.

A fleet does not need a public CA: every board is provisioned with the fleet CA's certificate
and trusts only that. Keys are EC P-256 (fast to make, small on the wire); files are PEM,
private keys mode 0600. The CA is reused when its files exist, so re-running `fleet broker`
keeps every provisioned client trusting the broker.
"""

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.config import TlsMaterial

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_file: Path

    @classmethod
    def load_or_create(
        cls, directory: Path, common_name: str = "sled-fleet CA", valid_days: int = 3650
    ) -> "CertificateAuthority":
        cert_file, key_file = directory / CA_CERT, directory / CA_KEY
        if cert_file.exists() and key_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_file} is not an EC private key written by sled-fleet")
            return cls(key, x509.load_pem_x509_certificate(cert_file.read_bytes()), cert_file)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            _builder(name, name, key.public_key(), valid_days)
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
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        _write_key(key_file, key)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, cert_file)

    def issue(
        self,
        directory: Path,
        name: str,
        *,
        hosts: tuple[str, ...] = (),
        client: bool = False,
        valid_days: int = 825,
    ) -> tuple[Path, Path]:
        """Sign a new leaf certificate `name`: a server one naming `hosts` (IPs or DNS names,
        checked by clients against the address they dial), or a client one. Returns
        (cert_file, key_file)."""
        if not client and not hosts:
            raise ValueError("a server certificate needs at least one host name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(subject, self.cert.subject, key.public_key(), valid_days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
        _write_key(key_file, key)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, key_file


def broker_tls(
    directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, require_certificate: bool = False
) -> TlsMaterial:
    """CA (reused if present) plus a fresh server certificate for the broker's listener."""
    ca = CertificateAuthority.load_or_create(directory)
    cert_file, key_file = ca.issue(directory, "broker", hosts=hosts)
    return TlsMaterial(
        ca_file=ca.cert_file,
        cert_file=cert_file,
        key_file=key_file,
        require_certificate=require_certificate,
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, valid_days: int
) -> x509.CertificateBuilder:
    # Backdated a little so a board whose clock lags the broker's still accepts the cert.
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=valid_days))
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
