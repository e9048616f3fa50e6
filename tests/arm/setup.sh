#!/usr/bin/env bash
# Prepare ONNX Runtime's aarch64 build under qemu-user for `pytest -m arm` (tests/targets/test_onnx_arm.py).
#
# Makes, without touching the host's dpkg state or Python:
#   $FNEXPORT_ARM_ROOT/rootfs  an arm64 Python 3.11 from Debian 12's packages (unpacked, not installed)
#   $FNEXPORT_ARM_ROOT/site    aarch64 wheels from PyPI: onnxruntime and numpy, pinned below
# Needs a Debian/Ubuntu host with apt, network access, and qemu-user-static (as root:
# `apt-get install qemu-user-static`). About 260 MB on disk (rootfs 64 MB, wheels 190 MB); under a minute.
#
# onnxruntime 1.20.1 is pinned because it runs here: a FasterNet-T0 .ort made by the x86 build
# matched x86 to 1e-6 (FP32). 1.31.1's aarch64 wheel crashed at import under Debian 12's qemu 7.2.
set -euo pipefail

ROOT="${FNEXPORT_ARM_ROOT:-$HOME/.cache/fnexport/arm}"
ORT_VERSION="${ORT_VERSION:-1.20.1}"
NUMPY_VERSION="${NUMPY_VERSION:-2.2.6}"
SUITE="${DEBIAN_SUITE:-bookworm}"
PYTHON="${PYTHON:-python3}"  # a host Python with pip, only used to download the aarch64 wheels

command -v qemu-aarch64-static >/dev/null || { echo "qemu-aarch64-static missing: apt-get install qemu-user-static" >&2; exit 1; }
mkdir -p "$ROOT"/apt/{lists/partial,cache/archives/partial} "$ROOT"/debs "$ROOT"/rootfs
touch "$ROOT/apt/status"
cat > "$ROOT/apt/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security $SUITE-security main
SRC
# A private apt configuration: arm64 package lists and an empty dpkg status, so apt resolves the
# full dependency closure of Python for arm64 and the host's own apt state stays as it is.
cat > "$ROOT/apt/apt.conf" <<CONF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::State::Lists "$ROOT/apt/lists";
Dir::State::status "$ROOT/apt/status";
Dir::Cache "$ROOT/apt/cache";
Dir::Etc::SourceList "$ROOT/apt/sources.list";
Dir::Etc::SourceParts "/nonexistent";
CONF
export APT_CONFIG="$ROOT/apt/apt.conf"
apt-get update -qq
# Leave out packages only needed to manage a real system (tar, dpkg) or holding only data files.
pkgs=$(apt-get install -s --no-install-recommends python3.11-minimal libpython3.11-stdlib libstdc++6 \
  | awk '/^Inst/ {print $2}' | grep -v -E '^(tar|dpkg|media-types|readline-common|libtirpc-common)$')
(cd "$ROOT/debs" && apt-get download -qq $pkgs)
for deb in "$ROOT"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT/rootfs"; done
rm -rf "$ROOT/debs" "$ROOT/apt/lists" "$ROOT/apt/cache"

"$PYTHON" -m pip install --quiet --upgrade --target "$ROOT/site" --only-binary=:all: \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
  --python-version 3.11 --implementation cp "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"

PYTHONPATH="$ROOT/site" PYTHONNOUSERSITE=1 qemu-aarch64-static -L "$ROOT/rootfs" "$ROOT/rootfs/usr/bin/python3.11" \
  -c "import platform, onnxruntime; print('ready:', platform.machine(), 'onnxruntime', onnxruntime.__version__)"
echo "FNEXPORT_ARM_ROOT=$ROOT"
