#!/usr/bin/env bash
# Install mmtk and everything it needs on a fresh Debian/Ubuntu machine (run as root or with sudo).
# Usage: bash scripts/setup.sh [--dev]   (--dev: also the test tools and the optional pseudo-label and ONNX extras)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# open3d needs libusb at import time; install it only when missing.
if ! ldconfig -p 2>/dev/null | grep -q "libusb-1.0.so.0"; then
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 || {
            $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libusb-1.0-0 >/dev/null; }
    else
        echo "warning: install libusb-1.0 with your package manager (open3d needs it)" >&2
    fi
fi

extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev,pseudo,onnx]"; fi
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi  # make the new `mmtk` command visible
