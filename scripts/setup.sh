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

# Debian's and Ubuntu's own python3 refuses pip installs (PEP 668): say how to get a Python that accepts them.
if python3 -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
    echo "error: python3 here is the system's, which pip may not install into (PEP 668); create a virtual" \
         "environment and rerun: python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh $*" >&2
    exit 2
fi

extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev,pseudo,onnx]"; fi
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi  # make the new `mmtk` command visible
