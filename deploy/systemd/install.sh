#!/bin/sh
# Install forwarder as the systemd service of deploy/systemd/forwarder.service:
#   a virtual environment under /opt/forwarder (the system's python3, readable
#   under ProtectHome=yes), the command linked at /usr/local/bin/forwarder (the
#   unit's ExecStart), the configuration at /etc/forwarder/forwarder.toml (an
#   existing one is kept) and the unit in /etc/systemd/system.
#
#   sudo deploy/systemd/install.sh                 # from this checkout
#   sudo deploy/systemd/install.sh dist/forwarder-0.1.0-py3-none-any.whl
#   sudo deploy/systemd/install.sh '.[speed]'      # with uvloop
#
# Run it again to upgrade. It does not start anything; then:
#   sudo systemctl daemon-reload && sudo systemctl enable --now forwarder
# The locations can be moved for a test run (FORWARDER_VENV, FORWARDER_BIN,
# FORWARDER_ETC, FORWARDER_UNIT_DIR), but the unit expects the defaults.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(cd "$here/../.." && pwd)
what=${1:-$source_dir}
python=${PYTHON:-/usr/bin/python3}
venv=${FORWARDER_VENV:-/opt/forwarder}
bin=${FORWARDER_BIN:-/usr/local/bin}
etc=${FORWARDER_ETC:-/etc/forwarder}
unit_dir=${FORWARDER_UNIT_DIR:-/etc/systemd/system}

case "$venv" in
  /home/*|/root/*) echo "install.sh: $venv is under a home directory, which the unit hides (ProtectHome=yes)" >&2; exit 2 ;;
esac

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$what"
install -d -m 0755 "$bin"
ln -sfn "$venv/bin/forwarder" "$bin/forwarder"
if [ ! -e "$etc/forwarder.toml" ]; then
  install -D -m 0644 "$source_dir/config.example.toml" "$etc/forwarder.toml"
fi
install -D -m 0644 "$here/forwarder.service" "$unit_dir/forwarder.service"
"$bin/forwarder" --version
