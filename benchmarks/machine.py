"""What the suite ran on: CPU, cores, Python and package versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from importlib import metadata

from benchmarks.procs import CPUS

PACKAGES = ("aiohttp", "aiobotocore", "botocore", "boto3", "orjson", "msgspec", "uvloop", "structlog", "prometheus-client")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def wrk_version() -> str:
    path = shutil.which("wrk")
    if path is None:
        return "not installed (aiohttp load generator used)"
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else path


def describe() -> list[tuple[str, str]]:
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", cpu_model()),
        ("cores", f"{os.cpu_count()} (usable: {len(CPUS)})"),
        ("kernel", platform.release()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("packages", ", ".join(f"{p} {version(p)}" for p in PACKAGES)),
        ("load generator", wrk_version()),
        ("load average at start", load_average()),
    ]


def load_average() -> str:
    """Other work on the machine skews every figure; the report says how busy it was."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"
