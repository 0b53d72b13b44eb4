#!/usr/bin/env bash
# Install edgebox as a systemd service on this box.
#
#   sudo deploy/install.sh [--device-id ID] [--broker URL] [--source DIR] [--no-start]
#   deploy/install.sh --root /tmp/stage --no-venv      # stage the files only (no root, no systemctl)
#
# What it does (idempotent: an existing config or password file is never overwritten):
#   /opt/edgebox/venv            a virtualenv with edgebox installed from --source (default: this repo)
#   /opt/edgebox/models          where GGUF models go (read-only for the service)
#   /etc/edgebox/edgebox.toml    the config, from deploy/edgebox.toml with the device id and broker filled in
#   /etc/edgebox/mqtt-password   0600 root; from $EDGEBOX_MQTT_PASSWORD, or asked for (empty: anonymous)
#   /etc/edgebox/api-key         0600 root; the HTTP API's Bearer key, from $EDGEBOX_API_KEY or random
#   /etc/systemd/system/edgebox.service   the unit, checked with systemd-analyze verify
# State (/var/lib/edgebox) and cache (/var/cache/edgebox) are created by systemd (StateDirectory=,
# CacheDirectory=) for the service's dynamic user.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root=""
source_dir="$(dirname "$here")"
device_id="$(hostname -s 2>/dev/null || hostname)"
broker="mqtt://127.0.0.1:1883"
make_venv=1
start=1

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="${2:?--root needs a directory}"; shift 2 ;;
        --source) source_dir="${2:?--source needs a directory}"; shift 2 ;;
        --device-id) device_id="${2:?--device-id needs a value}"; shift 2 ;;
        --broker) broker="${2:?--broker needs a URL}"; shift 2 ;;
        --no-venv) make_venv=0; shift ;;
        --no-start) start=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
if ! [[ "$device_id" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; then
    echo "install.sh: device id '$device_id' must be letters, digits, '.', '_' or '-' (64 at most)" >&2
    exit 2
fi
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or stage with --root DIR)" >&2
    exit 2
fi

venv="/opt/edgebox/venv"
etc="$root/etc/edgebox"
unit_dir="$root/etc/systemd/system"
install -d -m 0755 "$root/opt/edgebox" "$root/opt/edgebox/models" "$unit_dir"
install -d -m 0755 "$etc"

if [ "$make_venv" = 1 ]; then
    python3 -m venv "$root$venv"
    "$root$venv/bin/pip" install --quiet --upgrade pip
    "$root$venv/bin/pip" install --quiet "$source_dir"
    exe="$venv/bin/edgebox"
else
    # staging or a hand-made environment: use the edgebox already on PATH
    exe="$(command -v edgebox || echo "$venv/bin/edgebox")"
fi

if [ ! -e "$etc/edgebox.toml" ]; then
    sed -e "s|^device_id = .*|device_id = \"$device_id\"|" \
        -e "s|^username = .*|username = \"$device_id\"|" \
        -e "s|^broker = .*|broker = \"$broker\"|" \
        -e "s|^model = .*|# model = \"/opt/edgebox/models/model.gguf\"   # put a GGUF there; unset: the bundled tiny model|" \
        "$here/edgebox.toml" > "$etc/edgebox.toml"
    chmod 0644 "$etc/edgebox.toml"
    echo "wrote $etc/edgebox.toml (device $device_id, broker $broker)"
else
    echo "kept existing $etc/edgebox.toml"
fi

if [ ! -e "$etc/mqtt-password" ]; then
    password="${EDGEBOX_MQTT_PASSWORD-}"
    if [ -z "$password" ] && [ -z "$root" ] && [ -t 0 ]; then
        read -r -s -p "broker password for user $device_id (empty: none): " password
        echo
    fi
    (umask 077 && printf '%s\n' "$password" > "$etc/mqtt-password")
    echo "wrote $etc/mqtt-password (0600)"
fi

if [ ! -e "$etc/api-key" ]; then
    key="${EDGEBOX_API_KEY-}"
    [ -n "$key" ] || key="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
    (umask 077 && printf '%s\n' "$key" > "$etc/api-key")
    echo "wrote $etc/api-key (0600): HTTP clients send Authorization: Bearer <its content>"
fi

sed "s|^ExecStart=/opt/edgebox/venv/bin/edgebox |ExecStart=$exe |" "$here/edgebox.service" > "$unit_dir/edgebox.service"
chmod 0644 "$unit_dir/edgebox.service"
echo "wrote $unit_dir/edgebox.service (ExecStart=$exe)"

if [ -z "$root" ]; then
    if command -v systemd-analyze >/dev/null; then
        systemd-analyze verify "$unit_dir/edgebox.service"
    fi
    systemctl daemon-reload
    if [ "$start" = 1 ]; then
        systemctl enable --now edgebox.service
        echo "started: journalctl -u edgebox -f; edgebox client devices"
    else
        echo "installed; start with: systemctl enable --now edgebox"
    fi
fi
