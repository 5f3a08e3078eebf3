#!/usr/bin/env bash
# Onion benchmark: time to reachable, memory, a 100 MB NAR through the onion.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/kiss-onion ./cmd/kiss-onion
exec go run ./bench/onion -binary bin/kiss-onion "$@"
