#!/usr/bin/env bash
# Serving benchmark: kiss-onion against nginx on the same cache directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  # Debian starts nginx on port 80 on install; the benchmark runs its own.
  $sudo systemctl stop nginx 2>/dev/null || true
fi
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/kiss-onion ./cmd/kiss-onion
exec go run ./bench/serve -binary bin/kiss-onion "$@"
