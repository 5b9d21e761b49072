#!/usr/bin/env bash
# Installs the Debian packages the stack and its tests run: redis-server (Streams, XAUTOCLAIM) and
# redis-sentinel (the failover test, tests/integration/test_sentinel_failover.py).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 && command -v redis-sentinel >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq redis-server redis-sentinel
