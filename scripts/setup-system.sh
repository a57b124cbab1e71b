#!/usr/bin/env bash
# Installs what the tests need from the system rather than from pip: etcd, the replicated ledger
# store's server (Debian package etcd-server) and its client etcdctl (etcd-client: the multi-host tests
# ask the cluster who its members are), and Chromium with its matching driver (chromium,
# chromium-driver) for the dashboard's browser tests. Installs only what is missing.
set -euo pipefail
packages=()
command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || packages+=(etcd-client)
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || packages+=(chromium chromium-driver)
if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup-system: ${packages[*]} not installed and installing needs root; run as root:" \
         "apt-get update && apt-get install -y ${packages[*]}" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "setup-system: installing ${packages[*]}"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${packages[@]}"
