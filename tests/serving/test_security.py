"""Certificates and tokens: a generated certificate verifies for every name it should and no
other, its key is private, user files are used as they are, tokens are compared exactly."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from jupyter_mlcloud.serving import security


def _handshake(files: security.TLSFiles, server_name: str) -> None:
    """A real TLS handshake on loopback: a server with ``files``, a client verifying with
    ``files.ca_file`` and checking ``server_name``; raises on failure."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.certfile, files.keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=files.ca_file)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(b"x")
    finally:
        thread.join(10)
        listener.close()


def test_generated_certificate_names_its_hosts_and_keeps_its_key_private() -> None:
    files = security.tls_files(["10.1.2.3", "node7.example"])
    try:
        assert files.ca_file == files.certfile
        assert stat.S_IMODE(os.stat(files.keyfile).st_mode) == 0o600
        assert files.directory is not None
        assert stat.S_IMODE(os.stat(files.directory).st_mode) == 0o700
        cert = x509.load_pem_x509_certificate(Path(files.certfile).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.IPAddress)) == {
            ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")}
        assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "node7.example"}
        for name in ("127.0.0.1", "localhost"):
            _handshake(files, name)  # verified with ca_file, hostname checked
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(files, "other.example")
    finally:
        files.remove()
    assert not os.path.exists(files.directory)


def test_another_endpoints_certificate_does_not_verify() -> None:
    one, other = security.tls_files(), security.tls_files()
    try:
        mixed = security.TLSFiles(one.certfile, one.keyfile, other.ca_file)
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(mixed, "127.0.0.1")
    finally:
        one.remove()
        other.remove()


def test_user_files_are_used_as_they_are(tmp_path: Path) -> None:
    pair = security.self_signed(["127.0.0.1"])
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    files = security.tls_files(certfile=str(cert), keyfile=str(key))
    assert (files.certfile, files.keyfile, files.ca_file, files.directory) == (
        str(cert), str(key), str(cert), None)
    _handshake(files, "127.0.0.1")
    files.remove()
    assert cert.exists() and key.exists()  # never the user's files


def test_user_files_must_come_in_pairs_and_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="certfile and keyfile go together"):
        security.tls_files(certfile=str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="is not a file"):
        security.tls_files(certfile=str(tmp_path / "c.pem"), keyfile=str(tmp_path / "k.pem"))


def test_tokens_are_random_and_compared_exactly() -> None:
    token = security.new_token()
    assert len(token) >= 40 and token != security.new_token()
    assert security.bearer_matches(f"Bearer {token}", token)
    assert security.bearer_matches(f"bearer {token}", token)  # the scheme is case-insensitive
    for header in (None, "", token, f"Basic {token}", f"Bearer {token[:-1]}",
                   f"Bearer {token}x"):
        assert not security.bearer_matches(header, token)
