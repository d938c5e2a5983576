#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the Go
# modules pinned in this directory into a cache outside the repository, keyed by the
# Kubernetes version and a hash of what decides the binaries (go.mod, go.sum, our etcd
# main, the stamped version, the Go version), and prints that bin directory.
# A second run with the same pins rebuilds nothing. Progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

command -v go >/dev/null || { echo "build.sh: Go is needed to build the control plane (go.dev/doc/install)" >&2; exit 1; }
version="$(awk '$1 == "k8s.io/kubernetes" {print $2}' go.mod)"
major="${version#v}"; major="${major%%.*}"
minor="${version#v*.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# The key: what decides the binaries (the pins, our etcd main, the stamped version).
key="$({ cat go.mod go.sum cmd/etcd/main.go; echo "$ldflags"; go env GOVERSION; } | sha256sum | cut -c1-12)"
cache="${LORARESUME_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loraresume/kube}"
bin="$cache/$version-$key/bin"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler)

built() { for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done; }
if built; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9   # another build of the same cache (a parallel make or test run) finishes first
if built; then echo "$bin"; exit 0; fi

pkgs=(./cmd/etcd k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler)

start=$SECONDS
echo "control plane $version: resolving packages (first time: downloads ~0.6 GB of Go modules)..." >&2
total="$(CGO_ENABLED=0 go list -deps "${pkgs[@]}" | wc -l)"
echo "control plane $version: compiling $total packages into $bin (first time: ~14 min on 2 cores)..." >&2
tmp="$(mktemp -d "$cache/.build-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
if ! CGO_ENABLED=0 go build -v -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}" 2>&1 |
  { n=0; t0=$SECONDS
    while IFS= read -r line; do
      if [[ $line == *" "* ]]; then echo "$line" >&2; continue; fi   # compiler messages (package paths have no spaces)
      n=$((n + 1))
      if (( n % 250 == 0 )); then echo "  $n/$total packages, $((SECONDS - t0))s" >&2; fi
    done; }
then
  echo "build.sh: go build failed (messages above)" >&2
  exit 1
fi
mkdir -p "$bin"
for b in "${binaries[@]}"; do mv "$tmp/$b" "$bin/$b"; done
echo "control plane $version: built in $((SECONDS - start))s" >&2
echo "$bin"
