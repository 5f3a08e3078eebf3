#!/usr/bin/env bash
# Upstream benchmark: nix substituting a closure through serve --upstream
# (cold and warm) and straight from the upstream nginx. Flags go to
# bench/upstream (see -h).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps
if ! command -v nginx >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light
  # Debian starts nginx on port 80 on install; the benchmark runs its own.
  $sudo systemctl stop nginx 2>/dev/null || true
fi
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/kiss-onion ./cmd/kiss-onion
exec go run ./bench/upstream -binary bin/kiss-onion "$@"
