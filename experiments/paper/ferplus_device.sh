#!/bin/bash
# The FER+ paper run (configs/ferplus.py: 200 epochs, batch 128, Table 1, cosine loss, the paper's
# augmentation) on a lent GPU machine, which has JAX, Flax, Optax and Orbax but no TensorFlow, TFDS,
# ml_collections or clu, and reaches no network. Prepared here, once (paths from the repo root):
#
#   python -m fermsca.datasets.packed --config configs/ferplus.py --output .device/ferplus_majority.fpk \
#       --config.dataset.manual_dir=/data/ferplus        # FER+ train + validation, ~41 MiB
#   echo /.device/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: -d .device/wheels ml-collections==1.1.0 clu==0.0.12
#
# Then each device call carries `.device` and runs, from the repo root:
#
#   bash experiments/paper/ferplus_device.sh step           # img/s at batch 128 and 1024 (gpu_step), ~4 min
#   bash experiments/paper/ferplus_device.sh train 480      # trains for at most 480 s, then saves and stops
#
# `train` trains with the split on the device (data_on_device "auto" on a GPU) from the packed file,
# resuming from .device/resume.tar when it is there, and leaves in $OUT (at most 8 files come back):
# - when the run finished: results.json, the figures and best.tar (the best checkpoint by validation,
#   for `predict --checkpoint`);
# - when the time ran out first: resume.tar.aa, .ab... (the run's checkpoints, in parts of 15 MB, the
#   most a returned file may hold), to join into .device/resume.tar for the next call:
#   cat resume.tar.* > .device/resume.tar
# - train.log either way.
# Extra arguments after the seconds go to fermsca.main (e.g. --config.max_steps=3 for a check).
# Runs on a CPU too, for that check: PYTHON=.venv/bin/python OUT=/tmp/out bash ... train 120 ...
set -u -o pipefail
PHASE=${1:?step or train}
OUT=${OUT:?OUT: the folder whose files come back}
PYTHON=${PYTHON:-python3}
DEVICE_DIR=${DEVICE_DIR:-.device}
PACKED=$DEVICE_DIR/ferplus_majority.fpk
WORKDIR=${WORKDIR:-/tmp/ferplus_paper}
export FERMSCA_HUGEPAGES=0 PYTHONUNBUFFERED=1

if compgen -G "$DEVICE_DIR/wheels/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fermsca_site "$DEVICE_DIR"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/fermsca_site:$PWD
fi
command -v nvidia-smi > /dev/null && nvidia-smi -L > "$OUT/device.txt"

case $PHASE in
  step)
    "$PYTHON" -m experiments.perf.gpu_step --feeds device --output "$OUT/gpu_step.json" 2>&1 \
      | tail -c 1000000 > "$OUT/gpu_step.log"
    exit $?
    ;;
  train)
    SECONDS_LEFT=${2:?seconds the training may take}
    shift 2
    [ -f "$PACKED" ] || { echo "$PACKED is missing: pack it first (see this script's header)" >&2; exit 2; }
    mkdir -p "$WORKDIR"
    [ -f "$DEVICE_DIR/resume.tar" ] && tar -xf "$DEVICE_DIR/resume.tar" -C "$WORKDIR"
    # SIGTERM when the time is up: the run saves a checkpoint and exits with status 75.
    timeout --preserve-status -s TERM -k 120 "$SECONDS_LEFT" "$PYTHON" -m fermsca.main --config configs/ferplus.py \
      --workdir "$WORKDIR" --config.dataset.packed_file="$PACKED" "$@" 2>&1 | tail -c 4000000 > "$OUT/train.log"
    status=$?
    if [ -f "$WORKDIR/results.json" ]; then
      cp "$WORKDIR"/results.json "$WORKDIR"/*.png "$OUT"/ 2>/dev/null
      tar -cf "$OUT/best.tar" -C "$WORKDIR" best
    else
      latest=$(ls "$WORKDIR/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
      if [ -n "$latest" ]; then
        tar -cf - -C "$WORKDIR" "checkpoints/$latest" $(cd "$WORKDIR" && ls -d best 2>/dev/null) \
          | split -b 15M - "$OUT/resume.tar."
      fi
    fi
    echo "fermsca.main exit status $status" >> "$OUT/train.log"
    exit $status
    ;;
  *)
    echo "unknown phase $PHASE: step or train" >&2
    exit 2
    ;;
esac
