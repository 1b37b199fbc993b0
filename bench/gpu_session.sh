#!/bin/bash
# The runs behind bench/README.md's tables, grouped so that each group fits one 10-minute GPU call. Each run
# appends a record to $OUT/results.jsonl and writes a log beside it (OUT defaults to bench/results/latest);
# `python bench/table.py $OUT/results.jsonl` prints the table.
#
#   bash bench/gpu_session.sh table ARCH ...    # sft, reward, grpo on bench sizes, each with the TRL + PEFT baseline
#   bash bench/gpu_session.sh recipes ARCH ...  # sft, reward, grpo at the sizes of recipes/ARCH.yaml (peak memory)
#   bash bench/gpu_session.sh levers ARCH       # the speed levers, one at a time, on SFT and GRPO
set -u
mode=$1; shift
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

bench() {  # bench LABEL ARGS...: one bench/run.py run; its log's tail is shown if it fails
  local label=$1; shift
  python3 bench/run.py "$@" --out "$OUT/results.jsonl" > "$OUT/$label.log" 2>&1 || { echo "$label failed:"; tail -5 "$OUT/$label.log"; }
  echo "$label done at $SECONDS s"
}

for arch in "$@"; do
  work=/tmp/bench-$arch  # the random-weight base is built once per arch and reused
  case $mode in
    table)
      bench $arch-sft sft --arch $arch --steps 6 --baseline --work $work
      bench $arch-reward reward --arch $arch --steps 6 --baseline --work $work
      bench $arch-grpo grpo --arch $arch --steps 4 --completion-tokens 64 --baseline --work $work ;;
    recipes)
      bench $arch-sft-recipe sft --arch $arch --recipe recipes/$arch.yaml --steps 3 --work $work
      bench $arch-reward-recipe reward --arch $arch --recipe recipes/$arch.yaml --steps 3 --work $work
      bench $arch-grpo-recipe grpo --arch $arch --recipe recipes/$arch.yaml --steps 2 --reward-model shared --work $work ;;
    levers)
      sft="sft --arch $arch --steps 6 --work $work"
      bench $arch-sft-default $sft
      bench $arch-sft-no-checkpointing $sft --no-activation-checkpointing
      bench $arch-sft-every-2 $sft sft.activation_checkpointing_every_n_layers=2
      bench $arch-sft-offload $sft sft.activation_checkpointing_offload=true
      bench $arch-sft-eager $sft model.attn_implementation=eager
      bench $arch-sft-liger $sft 'sft.trainer_args={use_liger_kernel: true}'
      bench $arch-sft-compile $sft 'sft.trainer_args={torch_compile: true}'
      grpo="grpo --arch $arch --steps 4 --completion-tokens 64 --work $work"
      bench $arch-grpo-default $grpo
      bench $arch-grpo-no-checkpointing $grpo --no-activation-checkpointing
      bench $arch-grpo-continuous-batching $grpo 'grpo.trainer_args={use_transformers_continuous_batching: true}' ;;
    *) echo "unknown mode $mode: table, recipes or levers"; exit 2 ;;
  esac
done
