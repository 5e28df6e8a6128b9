"""Certificates for a TLS cluster whose scheduler and workers run on different hosts.

``up(tls=True)`` keeps a certificate in memory (``Security.temporary()``), which only the
processes of one machine can share. Across hosts every process needs the same files:
:func:`cluster_certificates` writes a certificate authority and one certificate and key signed
by it, once per directory (kept afterwards), and says how to hand them to ``dask scheduler``,
``dask worker``, a ``Client`` or Dask config. Users with certificates of their own point
:class:`ClusterCertificates` at them instead.

Every connection then needs a certificate signed by that authority (Dask requires client
certificates), so a process without them, or speaking plain TCP, is refused.
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cert.pem", "key.pem"
NAME = "dask-internal"  # Dask does not check host names; the CA is what is trusted


@dataclass(frozen=True)
class ClusterCertificates:
    """The three PEM files every process of one TLS cluster uses.

    ``ca_file`` is the authority that every side checks the other's certificate against;
    ``cert_file`` and ``key_file`` are the certificate and private key each process presents
    (scheduler, workers and clients alike).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> ClusterCertificates:
        """The certificates already in ``directory`` (``ca.pem``, ``cert.pem``, ``key.pem``)."""
        folder = Path(directory).expanduser()
        found = cls(folder / CA_FILE, folder / CERT_FILE, folder / KEY_FILE)
        missing = [p.name for p in found.files() if not p.is_file()]
        if missing:
            raise ValueError(
                f"directory {str(folder)!r} lacks {', '.join(missing)}; it needs {CA_FILE},"
                f" {CERT_FILE} and {KEY_FILE} (make them with mlc.cluster_certificates)."
            )
        found.check_key_permissions()
        return found

    def files(self) -> tuple[Path, Path, Path]:
        return self.ca_file, self.cert_file, self.key_file

    def check_key_permissions(self) -> None:
        """Refuse a private key that users other than its owner may read."""
        mode = stat.S_IMODE(self.key_file.stat().st_mode)
        if mode & 0o077:
            raise ValueError(
                f"private key {str(self.key_file)!r} has permissions {mode:o}; it must be"
                f" readable by its owner only (chmod 600)."
            )

    def security(self) -> Any:
        """A ``distributed.Security`` for a ``Client`` (or an in-process scheduler or worker)
        of this cluster, with encryption required."""
        from distributed.security import Security

        ca, cert, key = (str(p) for p in self.files())
        return Security(
            tls_ca_file=ca,
            tls_client_cert=cert, tls_client_key=key,
            tls_scheduler_cert=cert, tls_scheduler_key=key,
            tls_worker_cert=cert, tls_worker_key=key,
            require_encryption=True,
        )

    def cli_args(self) -> list[str]:
        """The flags that ``dask scheduler --protocol tls`` and ``dask worker tls://…`` take."""
        ca, cert, key = (str(p) for p in self.files())
        return ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]

    def config(self) -> dict[str, Any]:
        """The same as Dask config, for ``dask.config.set`` or a YAML file under
        ``~/.config/dask/``: a ``Client`` made with no ``security=`` then uses them."""
        ca, cert, key = (str(p) for p in self.files())
        return {
            "distributed.comm.require-encryption": True,
            "distributed.comm.tls.ca-file": ca,
            **{f"distributed.comm.tls.{role}.{kind}": path
               for role in ("client", "scheduler", "worker")
               for kind, path in (("cert", cert), ("key", key))},
        }


def cluster_certificates(directory: str | os.PathLike[str], *, days: int = 365,
                         hosts: list[str] | None = None) -> ClusterCertificates:
    """Write a certificate authority, and a certificate and key it signs, into ``directory``
    (made with mode 0700; the key file 0600) — or return the ones already there, so every
    host and every later call shares one set per cluster.

    Copy the directory to each host (or share it), then start the processes with
    :meth:`ClusterCertificates.cli_args` and connect with
    ``mlc.connect("tls://host:8786", security=certs)``. ``hosts`` (names or IP addresses) go
    into the certificate's subject alternative names, for clients that check them; Dask does
    not. The authority's own key is not kept: nothing else can be signed with it later.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a whole number of days >= 1, got {days!r}.")
    if hosts is not None and (isinstance(hosts, str) or not all(
            isinstance(h, str) and h for h in hosts)):
        raise ValueError(
            f"hosts must be a list of host names or IP addresses, got {hosts!r}."
        )
    folder = Path(directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"{str(folder)!r} is a file; cluster_certificates needs a directory (new or"
            f" holding {CA_FILE}, {CERT_FILE} and {KEY_FILE})."
        )
    existing = [folder / n for n in (CA_FILE, CERT_FILE, KEY_FILE) if (folder / n).exists()]
    if len(existing) == 3:
        return ClusterCertificates.from_directory(folder)
    if existing:
        raise ValueError(
            f"directory {str(folder)!r} holds only {', '.join(p.name for p in existing)}; it"
            f" needs all of {CA_FILE}, {CERT_FILE} and {KEY_FILE}, or none (to make them)."
        )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = _make(days, hosts or [])
    made = ClusterCertificates(folder / CA_FILE, folder / CERT_FILE, folder / KEY_FILE)
    # The key first and never world-readable, not even for a moment.
    _write(made.key_file, key_pem, 0o600)
    _write(made.cert_file, cert_pem, 0o644)
    _write(made.ca_file, ca_pem, 0o644)
    return made


def _write(path: Path, data: bytes, mode: int) -> None:
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def _make(days: int, hosts: list[str]) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, certificate, private key), PEM; EC P-256 keys, quick to make."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlcloud cluster CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(NAME)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        ca_cert.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )
