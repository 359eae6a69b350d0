"""Certificates and keys for trying the deployment runtime on one machine (`medfedpure certs`).

A SuperLink serves TLS with a certificate signed by a certificate authority the SuperNodes and
the `flwr` CLI trust (`ca.crt`); each SuperNode proves who it is with its own EC key pair, whose
public half the coordinator registers (`flwr supernode register nodeNN.pub <connection>`) on a
SuperLink started with `--enable-supernode-auth`. These files are for a local try (127.0.0.1,
30 days); a hospital network uses certificates from its own authority.

```
<out>/ca.crt, ca.key             the authority (keep ca.key away from the nodes)
<out>/server.pem, server.key     the SuperLink's certificate (127.0.0.1, localhost) and key
<out>/node01.key, node01.pub     one SuperNode's key pair (OpenSSH format), one pair per node
```
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from medfedpure.storage import atomic_write_bytes

VALID_DAYS = 30


def _private_pem(key: ec.EllipticCurvePrivateKey, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _certificate(subject: str, issuer: x509.Name, public_key, signing_key, ca: bool,
                 hosts: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_host_name(h) for h in hosts]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _host_name(host: str) -> x509.GeneralName:
    """An IP address (v4 or v6) or a DNS name, as a certificate's subject alternative name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_local_certificates(out: Path | str, nodes: int, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
                            ) -> dict[str, Path]:
    """A CA, the SuperLink's certificate for `hosts`, and `nodes` SuperNode key pairs under `out`.
    Refuses to overwrite any of them (a running federation may be using them)."""
    if nodes < 1:
        raise ValueError("--nodes must be at least 1")
    out = Path(out)
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [f"node{i:02d}.{ext}" for i in range(1, nodes + 1) for ext in ("key", "pub")]
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise FileExistsError(f"'{out}' already holds {', '.join(existing)}; use another --out or remove them")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MedFedPure local CA")])
    ca = _certificate("MedFedPure local CA", ca_name, ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate(hosts[0], ca_name, server_key.public_key(), ca_key, ca=False, hosts=hosts)
    files = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM), "ca.key": _private_pem(ca_key),
             "server.pem": server.public_bytes(serialization.Encoding.PEM), "server.key": _private_pem(server_key)}
    for i in range(1, nodes + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"node{i:02d}.key"] = _private_pem(key, serialization.PrivateFormat.OpenSSH)
        files[f"node{i:02d}.pub"] = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n"
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    for name in files:
        if name.endswith(".key"):
            (out / name).chmod(0o600)
    return {name: out / name for name in files}
