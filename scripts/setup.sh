#!/usr/bin/env bash
# Set up a fresh Debian machine for the workbench: Debian packages, then a virtual environment.
# Safe to run again: it installs only what is missing. Used by scripts/main.sh and scripts/test.sh.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

# Debian packages the workbench and its tests use. python3-venv gives `python3 -m venv`;
# e2fsprogs makes and checks the ext4 file systems inside images; tar and gzip read OCI layers.
apt_packages=(python3 python3-venv python3-dev gcc e2fsprogs tar gzip)

missing=()
for package in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The virtual environment, reinstalled only when pyproject.toml changes.
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.workbench-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "setup: installing the workbench and its dependencies into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$wanted" > "$stamp"
fi
