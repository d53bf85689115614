"""Credentials of a loopback deployment: a throw-away TLS CA and server certificate, and SuperNode
keys for node authentication (flwr 1.39 takes NIST elliptic-curve keys in OpenSSH format)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedsim.errors import EngineError


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_test_certificates(directory: str | Path, days: int = 2) -> Certificates:
    """A throw-away CA and a server certificate for 127.0.0.1 (SAN ``IP:127.0.0.1``), via openssl.

    For tests and loopback runs only; on real machines use certificates from your own CA with the
    SuperLink's real address in the SAN.
    """
    openssl = shutil.which("openssl")
    if not openssl:
        raise EngineError("TLS needs the 'openssl' command, which is not on PATH",
                          "install openssl, or set deploy.insecure = true for a loopback test")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                        "server.pem", "san.ext"))
    ext.write_text("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", str(days), "-subj", "/CN=fedsim-test-ca"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", str(days), "-extfile", ext],
    ]
    for cmd in steps:
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise EngineError(f"openssl failed ({' '.join(str(c) for c in cmd[:3])}): {res.stderr.strip()[-400:]}",
                              "check that openssl works: openssl version")
    return Certificates(ca=ca.resolve(), cert=cert.resolve(), key=key.resolve())


def make_node_key(path: str | Path) -> Path:
    """An OpenSSH EC P-384 key pair (``ssh-keygen -t ecdsa -b 384``; flwr 1.39 takes NIST curves only):
    private key at ``path`` (0600), public key at ``path.pub``, whose path is returned."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH) + b"\n")
    return pub
