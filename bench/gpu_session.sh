#!/bin/bash
# The runs behind bench/README.md's tables, in one GPU session: results.jsonl and a log per run in $OUT
# (default bench/results/latest).
# usage: bash bench/gpu_session.sh ARCH [ARCH ...]
set -u
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
for arch in "$@"; do
  work=/tmp/bench-$arch
  python3 bench/run.py sft --arch $arch --steps 6 --baseline --work $work --out "$OUT/results.jsonl" > "$OUT"/$arch-sft.log 2>&1 || tail -5 "$OUT"/$arch-sft.log
  python3 bench/run.py reward --arch $arch --steps 6 --work $work --out "$OUT/results.jsonl" > "$OUT"/$arch-reward.log 2>&1 || tail -5 "$OUT"/$arch-reward.log
  python3 bench/run.py grpo --arch $arch --steps 4 --completion-tokens 64 --reward-model shared --baseline --work $work --out "$OUT/results.jsonl" > "$OUT"/$arch-grpo.log 2>&1 || tail -5 "$OUT"/$arch-grpo.log
  echo "$arch done at $SECONDS s"
done
