#!/usr/bin/env bash
# Set up a fresh Debian machine for the workbench: Debian packages, then a virtual environment.
# Safe to run again: it installs only what is missing. Used by scripts/main.sh and scripts/test.sh.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

# Debian packages the workbench and its tests use. python3-venv gives `python3 -m venv`;
# e2fsprogs makes and checks the ext4 file systems inside images; tar and gzip read OCI layers;
# gcc, python3-dev, liblz4-dev, libzstd-dev and pkg-config build the native ZFile decoder
# (optional: without them the install goes on and the pure-Python reader is used);
# docker-registry (the CNCF registry), skopeo, umoci, containerd and runc are the real peers of
# the registry tests (skopeo copy and ctr image pull against the embedded registry); fuse3 and
# libfuse3-dev serve the image as a FUSE disk file (pip builds pyfuse3 against libfuse3), and
# util-linux's losetup attaches it as a loop device; fio drives `workbench bench device`;
# golang-github-containerd-containerd-dev ships containerd's .proto files, which the
# snapshotter compiles with grpcio-tools on first use; busybox-static is the one binary inside
# the snapshotter tests' container images and the shell of the experiments' stand-in images
# (workbench.experiments.standin), and the content of the tiny dataset image (busybox).
# The evaluation images (workbench dataset): debootstrap makes the Debian base layer,
# iproute2's `ip` brings up lo in a workload's own network namespace (util-linux's unshare
# and coreutils' chroot do the rest); iproute2 (ip netns, veth, tc tbf) also makes the P2P
# tests' hosts, and curl asks their agents.
apt_packages=(python3 python3-venv python3-dev gcc pkg-config liblz4-dev libzstd-dev e2fsprogs
    tar gzip docker-registry skopeo umoci containerd runc fuse3 libfuse3-dev util-linux fio
    golang-github-containerd-containerd-dev busybox-static debootstrap iproute2 coreutils curl)

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
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null
fi

# The virtual environment, reinstalled when pyproject.toml, setup.py or the C source change
# (the reinstall rebuilds the native extension).
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.workbench-installed
wanted=$(cat pyproject.toml setup.py workbench/formats/_zfile_native.c | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "setup: installing the workbench and its dependencies into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$wanted" > "$stamp"
fi
