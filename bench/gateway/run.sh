#!/usr/bin/env bash
# Gateway benchmark: nix substituting a closure from the read onion through
# `kiss-onion proxy`, and through a stock tor with ALL_PROXY, on a private
# Tor network. Flags go to bench/gateway (see -h).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/kiss-onion ./cmd/kiss-onion
exec go run ./bench/gateway -binary bin/kiss-onion "$@"
