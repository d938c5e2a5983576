#!/usr/bin/env bash
# Builds gofakes3's own server command (an S3-compatible server in Go, in-memory backend) from the
# Go module pinned in this directory into a cache outside the repository, keyed by a hash of what
# decides the binary (go.mod, go.sum, the build flags, the Go version), and prints the binary's path.
# Why: moto, one Python process, answers in seconds under the scale benchmark's load; this one is
# fast enough that what remains is the operator's (benchmarks/scale.py --s3-server go).
# A second run with the same pins rebuilds nothing. Progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

command -v go >/dev/null || { echo "build.sh: Go is needed to build the S3 server (go.dev/doc/install)" >&2; exit 1; }
version="$(go list -m -f '{{.Version}}' github.com/johannesboyne/gofakes3)"
pkg=github.com/johannesboyne/gofakes3/cmd/gofakes3
ldflags="-s -w"
key="$({ cat go.mod go.sum; echo "$pkg $ldflags"; go env GOVERSION; } | sha256sum | cut -c1-12)"
cache="${LORARESUME_S3_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loraresume/s3}"
bin="$cache/gofakes3-$version-$key/gofakes3"

if [[ -x "$bin" ]]; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9   # another build of the same cache (a parallel make or test run) finishes first
if [[ -x "$bin" ]]; then echo "$bin"; exit 0; fi

start=$SECONDS
echo "S3 server (gofakes3 $version): building into $(dirname "$bin") (first time: ~30 s, ~50 MB of Go modules)..." >&2
tmp="$(mktemp -d "$cache/.build-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
if ! CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/gofakes3" "$pkg" >&2; then
  echo "build.sh: go build failed (messages above)" >&2
  exit 1
fi
mkdir -p "$(dirname "$bin")"
mv "$tmp/gofakes3" "$bin"
echo "S3 server (gofakes3 $version): built in $((SECONDS - start))s" >&2
echo "$bin"
