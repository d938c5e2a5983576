#!/bin/sh
# goodput.py --trainer-python benchmarks/triton_keys/python.sh: the locked trainer ($LOCK_PYTHON's own
# PYTHONPATH) with this directory first, so sitecustomize.py logs every Triton cache key's parts to
# $TKEY_DIR/<pid>.jsonl. A diagnostic for the device only (benchmarks/README.md); never in an image.
P=$(sed -n 's/^PYTHONPATH=\([^ ]*\) exec.*/\1/p' "$LOCK_PYTHON")
D=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH=$D:$P exec "$(dirname "$LOCK_PYTHON")/python3" "$@"
