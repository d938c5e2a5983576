#!/bin/bash
# goodput.py --trainer-python benchmarks/py_spy_trainer.sh: runs the trainer under py-spy (wall clock: --idle,
# every thread, 100 Hz, chrometrace, which keeps each sample's time) for the uninterrupted run and every
# relaunch (LORARESUME_ATTEMPT >= 2); a preempted story's first attempt runs unprofiled through exec, so its
# SIGTERM reaches the trainer itself. The trainer's stdout is passed on and also kept with the time each line
# was read (startup_profile.py lines the profile up with the trainer's start-up phases by it). py-spy exits 0
# whatever its child did, so the exit code is the one the trainer wrote in its termination message.
# Env: LOCK_PYTHON (the trainer's interpreter), PYSPY (py-spy's binary), PROF_DIR (where profiles go).
set -u
n=${LORARESUME_ATTEMPT:-1}
term=""; cfg=""; prev=""
for a in "$@"; do
  [ "$prev" = "--termination-log" ] && term=$a
  [ "$prev" = "--config" ] && cfg=$a
  prev=$a
done
case "$cfg" in */uninterrupted/*) tag=uninterrupted ;; *) tag="a$n" ;; esac
if [ "$n" -lt 2 ] && [ "$tag" != uninterrupted ]; then exec "$LOCK_PYTHON" "$@"; fi
tag="$tag-$$"
echo "$EPOCHREALTIME $*" > "$PROF_DIR/start-$tag.txt"
"$PYSPY" record --idle --threads --rate 100 --format chrometrace --output "$PROF_DIR/prof-$tag.json" \
  -- "$LOCK_PYTHON" "$@" | while IFS= read -r line; do
  printf '%s\n' "$line"
  printf '%s %s\n' "$EPOCHREALTIME" "$line" >> "$PROF_DIR/events-$tag.txt"
done
echo "$EPOCHREALTIME end" >> "$PROF_DIR/start-$tag.txt"
code=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["exit_code"])' "$term" 2>/dev/null) || code=1
exit "${code:-1}"
