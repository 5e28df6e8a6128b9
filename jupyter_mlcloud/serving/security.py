"""Transport security of an endpoint: a self-signed TLS certificate per endpoint and a random
bearer token.

The certificate is its own trust anchor (no CA): clients verify with the certificate's PEM
(``ca_file``). It names ``localhost``, ``127.0.0.1`` and every bind address given, so the
hostname check passes for each of them.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

#: How long a generated certificate is valid: endpoints are long-lived, but not forever.
CERT_DAYS = 365


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM bytes (what crosses to a worker)."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class TLSFiles:
    """Where a server's certificate and key are, and the PEM a client verifies it with.

    ``directory`` is the private temporary folder holding generated files (``None`` for
    files the user gave, which are never removed).
    """

    certfile: str
    keyfile: str
    ca_file: str
    directory: str | None = None

    def remove(self) -> None:
        """Delete the generated files (a no-op for user-given ones)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _san(host: str) -> object:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def self_signed(hosts: Sequence[str] = ()) -> KeyPair:
    """A fresh self-signed server certificate (ECDSA P-256) for ``hosts`` plus ``localhost``
    and ``127.0.0.1``; IP literals become IP SANs, names DNS SANs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[str] = []
    for host in ("localhost", "127.0.0.1", *hosts):
        if host and host not in names and host not in ("0.0.0.0", "::"):
            names.append(host)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jupyter_mlcloud endpoint")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clock skew between hosts
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]),  # type: ignore[misc]
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def write_private(pair: KeyPair) -> TLSFiles:
    """``pair`` written to a fresh private temp dir (0700; the key 0600, created so, never
    readable by others even for a moment); the certificate doubles as ``ca_file``."""
    directory = tempfile.mkdtemp(prefix="mlcloud-tls-")  # mkdtemp makes it 0700
    certfile = os.path.join(directory, "cert.pem")
    keyfile = os.path.join(directory, "key.pem")
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.key_pem)
    with open(certfile, "wb") as f:
        f.write(pair.cert_pem)
    return TLSFiles(certfile, keyfile, certfile, directory)


def tls_files(hosts: Sequence[str] = (), *, certfile: str | None = None,
              keyfile: str | None = None, ca_file: str | None = None) -> TLSFiles:
    """The files a server uses: the user's ``certfile``/``keyfile`` as they are (verified
    with ``ca_file``, default the certificate itself), or a generated certificate for
    ``hosts`` in a private temp dir."""
    if (certfile is None) != (keyfile is None):
        raise ValueError("certfile and keyfile go together; pass both, or neither for a"
                         " generated certificate.")
    if certfile is not None and keyfile is not None:
        for label, path in (("certfile", certfile), ("keyfile", keyfile)):
            if not os.path.isfile(path):
                raise ValueError(f"{label} {path!r} is not a file.")
        return TLSFiles(os.fspath(certfile), os.fspath(keyfile), ca_file or certfile)
    return write_private(self_signed(hosts))


def new_token() -> str:
    """A random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time)."""
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
