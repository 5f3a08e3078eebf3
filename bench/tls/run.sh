#!/usr/bin/env bash
# TLS door benchmark: a narinfo GET on the TLS door against a plain listener.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/kiss-onion ./cmd/kiss-onion
exec go run ./bench/tls -binary bin/kiss-onion "$@"
