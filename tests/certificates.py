"""Certificate authorities and the certificates they issue, made with the openssl CLI, for the mTLS tests."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.tools import require_tool


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


class Authority:
    """A self-signed CA in ``directory`` (``<name>.crt``, ``<name>.key``) that issues server and client pairs."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = directory
        self.cert, self.key = directory / f"{name}.crt", directory / f"{name}.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                 "-keyout", str(self.key), "-out", str(self.cert), "-subj", f"/CN=forwarder test {name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, *, cn: str | None = None, san: str = "", client: bool = True,
              days: int = 2) -> Pair:
        """``<name>.crt`` and ``<name>.key``: for a client (clientAuth) or a server on 127.0.0.1 (serverAuth).

        ``san`` is openssl's subjectAltName syntax ("URI:spiffe://td/ns/a/sa/b,DNS:a.example"); ``days``
        below 0 makes a certificate that has already expired.
        """
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn or name}")
        extensions = self.directory / f"{name}.ext"
        lines = [f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
        if san or not client:
            lines.append(f"subjectAltName={san or 'IP:127.0.0.1'}")
        extensions.write_text("\n".join(lines) + "\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-CAcreateserial",
                 "-days", str(days), "-out", str(cert), "-extfile", str(extensions))
        return Pair(cert, key)


def kubernetes_secret_volume(directory: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Lay ``files`` out as the kubelet mounts a Secret: ``name -> ..data/name -> ..<version>/name``.

    Returns the stable paths (``directory/name``) a configuration names.
    """
    directory.mkdir(parents=True, exist_ok=True)
    swap_secret_volume(directory, files)
    for name in files:
        os.symlink(f"..data/{name}", directory / name)
    return {name: directory / name for name in files}


def swap_secret_volume(directory: Path, files: dict[str, Path]) -> None:
    """Update the volume as the kubelet does: a new ``..<version>`` directory, then an atomic swap of ``..data``."""
    versions = sorted(p for p in directory.glob("..v*"))
    version = directory / f"..v{len(versions) + 1}"
    version.mkdir()
    for name, source in files.items():
        (version / name).write_bytes(source.read_bytes())
    temporary = directory / "..data_tmp"
    os.symlink(version.name, temporary)
    os.replace(temporary, directory / "..data")
