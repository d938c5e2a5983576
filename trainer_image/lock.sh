#!/usr/bin/env bash
# Regenerates trainer_image/requirements-gpu.lock: every package of the trainer image's Python
# environment (requirements-gpu.txt and all it needs, transitively), pinned and sha256-hashed, for
# the image's Python (3.12) and platform (x86-64, glibc >= 2.28; the base is Ubuntu 24.04), wheels
# only. h200-constraints.txt (the H200 machine's `pip freeze`) keeps the packages that machine
# already has at its versions, so the GPU runs there install from the same set as the image.
#
# uv runs from a throwaway virtual environment (never the project's .venv). Usage, from anywhere:
#   trainer_image/lock.sh            # rewrite the lock
#   trainer_image/lock.sh --check    # exit 1 if the committed lock differs from a fresh resolve
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
UV_VERSION=0.13.9
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"

# The H200's versions constrain the resolve, except for the packages requirements-gpu.txt pins
# itself and these, whose H200 versions the image's stack rules out:
#   fsspec 2026.7.0   datasets 4.8.5 needs fsspec <= 2026.2.0
#   certifi 2026.7.22 unsloth 2026.10.9 needs certifi >= 2026.10.19
not_constrained=(fsspec certifi)
norm() { tr 'A-Z_.' 'a-z--'; }
skip=$( (grep -v '^[[:space:]]*#' "$here/requirements-gpu.txt" | sed 's/[<>=!~;[ ].*//'; printf '%s\n' "${not_constrained[@]}") \
  | grep . | norm)
while read -r line; do
  [[ -z $line || $line == \#* ]] && continue
  name=$(norm <<<"${line%%==*}")
  grep -qx -- "$name" <<<"$skip" || echo "$line"
done <"$here/h200-constraints.txt" >"$work/h200-constraints.txt"
cp "$here/requirements-gpu.txt" "$work/requirements-gpu.txt"

out="$work/requirements-gpu.lock"
(
  cd "$work"  # relative names: the lock's "# via" comments stay the same from run to run
  "$work/venv/bin/uv" pip compile --quiet \
    --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
    --only-binary :all: --generate-hashes \
    --custom-compile-command "trainer_image/lock.sh" \
    --constraint h200-constraints.txt \
    requirements-gpu.txt -o requirements-gpu.lock
)

if [[ ${1:-} == --check ]]; then
  diff -u "$here/requirements-gpu.lock" "$out"
else
  cp "$out" "$here/requirements-gpu.lock"
  echo "wrote $here/requirements-gpu.lock ($(grep -c '^[a-z0-9]' "$out") packages)"
fi
