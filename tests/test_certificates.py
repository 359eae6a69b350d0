"""`medfedpure certs`: a CA, the SuperLink's certificate and SuperNode keys that TLS accepts."""

import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from medfedpure.cli import main


def test_certificates_chain_and_keys(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--nodes", "2"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    hosts = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in hosts.get_values_for_type(x509.IPAddress)]
    for i in (1, 2):
        public = serialization.load_ssh_public_key((out / f"node{i:02d}.pub").read_bytes())
        private = serialization.load_ssh_private_key((out / f"node{i:02d}.key").read_bytes(), password=None)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert (out / f"node{i:02d}.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    assert not (out / "node03.pub").exists()

    # nothing is overwritten: a second call is refused in one line and the files stay as they were
    before = (out / "ca.crt").read_bytes()
    capsys.readouterr()
    assert main(["certs", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "Traceback" not in err and (out / "ca.crt").read_bytes() == before


def test_tls_handshake_with_the_local_ca(tmp_path):
    """A TLS server using server.pem is trusted by a client that trusts only ca.crt, for 127.0.0.1."""
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--nodes", "1"]) == 0
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / "server.pem", out / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(out / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
    thread.join(timeout=10)
    listener.close()
