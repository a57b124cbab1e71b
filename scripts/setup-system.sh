#!/usr/bin/env bash
# Installs what the tests need from the system rather than from pip: etcd, the replicated ledger
# store's server (Debian package etcd-server). Does nothing when `etcd` is already on PATH.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup-system: etcd is not installed and installing it needs root; run as root:" \
         "apt-get update && apt-get install -y etcd-server" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "setup-system: installing etcd-server (etcd is not on PATH)"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y etcd-server
