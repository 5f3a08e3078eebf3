#!/usr/bin/env bash
# Serving from a bucket: kiss-onion serve on a cache directory against
# kiss-onion serve --store s3://... on a SeaweedFS the harness starts.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps
command -v wrk >/dev/null || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk
}
export PATH="$PATH:/usr/local/go/bin"
weed=${KISS_ONION_WEED:-$(scripts/seaweedfs)}
go build -o bin/kiss-onion ./cmd/kiss-onion
exec go run ./bench/s3serve -binary bin/kiss-onion -weed "$weed" "$@"
