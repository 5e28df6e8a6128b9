"""Cluster certificates: written once with private permissions, signed by their own
authority, refused when incomplete or readable by others; and the API's clear refusals."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import jupyter_mlcloud as mlc
from tests.conftest import discovery_files


def test_certificates_are_written_once_signed_by_their_authority(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    certs = mlc.cluster_certificates(folder, hosts=["198.18.0.2", "scheduler.example"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(certs.key_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    ca = x509.load_pem_x509_certificate(certs.ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if not
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "scheduler.example" in names.get_values_for_type(x509.DNSName)
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["198.18.0.2"]
    # A second call (another host, a restart) reuses them: one set per cluster.
    before = certs.key_file.read_bytes()
    again = mlc.cluster_certificates(folder)
    assert again == certs and again.key_file.read_bytes() == before
    # The three ways to hand them on name the same files.
    args = certs.cli_args()
    assert args[args.index("--tls-key") + 1] == str(certs.key_file)
    assert certs.config()["distributed.comm.tls.worker.key"] == str(certs.key_file)
    security = certs.security()
    assert security.require_encryption and security.tls_client_key == str(certs.key_file)
    assert "BEGIN PRIVATE KEY" not in repr(security)


def test_bad_certificate_directories_and_options_are_refused(tmp_path: Path) -> None:
    certs = mlc.cluster_certificates(tmp_path / "certs")
    os.chmod(certs.key_file, 0o644)
    with pytest.raises(ValueError, match="permissions 644; it must be readable by its owner"):
        mlc.ClusterCertificates.from_directory(tmp_path / "certs")
    certs.cert_file.unlink()
    with pytest.raises(ValueError, match="holds only ca.pem, key.pem; it needs all of"):
        mlc.cluster_certificates(tmp_path / "certs")
    with pytest.raises(ValueError, match="lacks cert.pem"):
        mlc.connect("tls://127.0.0.1:1", security=tmp_path / "certs")
    with pytest.raises(ValueError, match="days must be a whole number of days >= 1, got 0"):
        mlc.cluster_certificates(tmp_path / "other", days=0)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="hosts must be a list of host names or IP addresses,"
                                         " got '10.0.0.5'"):
        mlc.cluster_certificates(tmp_path / "other", hosts="10.0.0.5")  # type: ignore[arg-type]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file; cluster_certificates needs a directory"):
        mlc.cluster_certificates(tmp_path / "a-file")


def test_tls_addresses_without_certificates_and_bad_security_are_refused(
        tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'tls://127.0.0.1:1' speaks TLS: pass security="):
        mlc.connect("tls://127.0.0.1:1")
    with pytest.raises(ValueError, match="security=42 is not understood"):
        mlc.connect("tls://127.0.0.1:1", security=42)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=f"tls={missing!r} is not understood"):
        mlc.up(workers=1, tls=missing)
    assert discovery_files() == []


def test_magics_start_and_attach_with_a_certificate_directory(tmp_path: Path,
                                                              shell: Any) -> None:
    from IPython.core.error import UsageError

    folder = tmp_path / "certs"
    mlc.cluster_certificates(folder)
    try:
        shell.run_line_magic("mlcloud", f"up --workers 1 --cpu --name tls-dir --tls {folder}")
        owner = mlc.current()
        assert owner.address.startswith("tls://127.0.0.1:")
        with pytest.raises(UsageError, match="speaks TLS: pass security="):
            shell.run_line_magic("mlcloud", f"connect {owner.address} --name bare")
        shell.run_line_magic("mlcloud", f"connect {owner.address} --name viewer --tls {folder}")
        viewer = mlc.current()
        assert viewer.name == "viewer" and viewer.address == owner.address
        assert viewer.client.submit(lambda: 6 * 7, pure=False).result(timeout=30) == 42
    finally:
        mlc.down(all=True)
    assert discovery_files() == []
