"""A CA, the central tier's server certificate and one sidecar's client certificate, made with the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SIDECAR_IDENTITY = "spiffe://cluster.local/ns/bench/sa/sidecar"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the central benchmark needs the openssl command (apt-get install openssl)")
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


def make(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *curve, "-days", "2", "-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=bench CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(name: str, extensions: str) -> tuple[Path, Path]:
        cert, key, csr, ext = (directory / f"{name}.{suffix}" for suffix in ("crt", "key", "csr", "ext"))
        _openssl("req", *curve, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        ext.write_text(extensions)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-days", "2", "-out", str(cert), "-extfile", str(ext))
        return cert, key

    server = issue("central", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    client = issue("sidecar", f"subjectAltName=URI:{SIDECAR_IDENTITY}\nextendedKeyUsage=clientAuth\n")
    return Pki(ca, *server, *client)
