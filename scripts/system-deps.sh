#!/usr/bin/env bash
# `make deps`: the programs the system test tier drives for real, installed on Debian or
# Ubuntu (apt-get, with sudo unless root); elsewhere, it says what to install. CI runs it too.
#   redis-server    Redis store, resume across workers, takeover
#   nginx-light     the shipped nginx.conf in front of the app
#   chromium        the chat page's browser tests (Playwright drives it; nothing downloads)
#   prometheus      the shipped prometheus.yml and the Grafana dashboard's queries
#   docker-compose  validates deploy/docker-compose.yml (no Docker engine needed)
#   systemd         systemd-analyze verifies deploy/systemd/ (no systemd runs)
#   postgresql      conversations in PostgreSQL (the tests initdb their own, in a temp dir)
set -euo pipefail
packages=(redis-server nginx-light chromium prometheus docker-compose systemd postgresql)
programs=(redis-server nginx chromium prometheus docker-compose systemd-analyze pg_ctl)

missing=()
for i in "${!programs[@]}"; do
  program=${programs[$i]}
  if ! command -v "$program" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$program" ] \
    && ! compgen -G "/usr/lib/postgresql/*/bin/$program" >/dev/null; then
    missing+=("${packages[$i]}")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system test programs: all present"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "not Debian or Ubuntu: install these with your package manager, then run make test:" >&2
  echo "  ${missing[*]}  (macOS: brew install redis nginx prometheus, and any Chromium)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
