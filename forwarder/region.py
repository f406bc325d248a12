"""Where the region comes from when the configuration does not name one, as the AWS SDKs resolve it.

``AWS_REGION`` (what EKS injects), ``AWS_DEFAULT_REGION``, the profile's
``region`` in the shared config file, else us-east-1; the forwarder says which
(the ``started`` line, ``check-config``). It sits below config.py, which calls it.
"""

from __future__ import annotations

import configparser
import os
from typing import Mapping

DEFAULT_REGION = "us-east-1"


def resolve_region(environ: Mapping[str, str]) -> tuple[str, str]:
    """(region, where it came from) when the configuration names none, as the AWS SDKs resolve it."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if environ.get(var):
            return environ[var], var
    profile = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
    path = environ.get("AWS_CONFIG_FILE") or os.path.join(environ.get("HOME") or os.path.expanduser("~"),
                                                          ".aws", "config")
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError, OSError):
        parser = configparser.RawConfigParser()  # an unreadable file names no region; botocore will say more
    for section in ((profile, f"profile {profile}") if profile == "default" else (f"profile {profile}",)):
        if parser.has_option(section, "region") and parser.get(section, "region").strip():
            return parser.get(section, "region").strip(), f"profile {profile} ({path})"
    return DEFAULT_REGION, "default"
