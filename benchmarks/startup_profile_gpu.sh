#!/bin/bash
# One device call (benchmarks/README.md, "Where a relaunch's start-up goes"): the image's locked package set,
# py-spy, then goodput.py's one-preemption 8B story with the uninterrupted run and the relaunch under py-spy
# (py_spy_trainer.sh). Profiles (gzipped), the trainer's timed stdout and goodput's JSON come back in $OUT.
# Needs .gpu/lock (gpu_lock.py prepare) and .gpu/pyspy/py-spy.xz (py-spy's binary, xz-compressed), carried.
set -u
STEPS=${STEPS:-8}
T0=$(date +%s)
export PROF_DIR=/tmp/prof; mkdir -p "$PROF_DIR"
{ date -u; nvidia-smi; python3 -c 'import torch;print("torch", torch.__version__, torch.cuda.get_device_name(0))'; } \
  > "$OUT/device.txt" 2>&1
eval "$(python3 benchmarks/gpu_lock.py install 2>"$OUT/install.log")" || { tail -30 "$OUT/install.log"; exit 1; }
[ -n "${LOCK_PYTHON:-}" ] || { echo "no LOCK_PYTHON"; tail -5 "$OUT/install.log"; exit 1; }
echo "install done at +$(( $(date +%s) - T0 )) s"
python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.gpu/pyspy/py-spy.xz'),open('/tmp/py-spy','wb'))"
chmod +x /tmp/py-spy && export PYSPY=/tmp/py-spy
"$PYSPY" --version >> "$OUT/device.txt"
python3 benchmarks/goodput.py --size 8b --variants restored --preemptions 1 --steps "$STEPS" \
  --trainer-python "$PWD/benchmarks/py_spy_trainer.sh" --budget-s "${BUDGET_S:-400}" --work /tmp/gw --out "$OUT"
echo "goodput rc=$? at +$(( $(date +%s) - T0 )) s"
cd "$PROF_DIR" && for f in prof-*.json; do [ -f "$f" ] && gzip -6 "$f" && cp "$f.gz" "$OUT/"; done
tar czf "$OUT/meta.tar.gz" events-* start-* 2>/dev/null
ls -la "$OUT"; echo "done at +$(( $(date +%s) - T0 )) s"
