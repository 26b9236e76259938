#!/usr/bin/env bash
# Issue 24's 3,000-iteration grid, two runs at a time, in GRID_DIR (a checkout), logs in LOGS. Re-running it resumes
# unfinished runs from their checkpoints and skips finished ones. New ICQ runs use --compile (the same math; float
# rounding differs); 2s3z split behavior seed 1 started eager, before --compile existed, in a worktree of 9830c2f
# (training bit-identical to main's eager path), and exact BC always runs eager (batched critic updates).
# The cap W is read from $LOGS/W when a capped run starts (the one-seed scan decides it; see long_runs.md).
cd "${GRID_DIR:-.}"; LOGS=${LOGS:-runs/logs}; mkdir -p "$LOGS"
common="--seed SEED --total-steps 3000 --eval-interval 300 --eval-episodes 64 --log-interval 50 --threads 1"
list=()
for s in 1 2 3; do
  list+=("2s3z split bc $s --map 2s3z --quality split --alpha inf --critic-updates batched")
  list+=("2s3z split behavior $s --map 2s3z --quality split --normalizer behavior --alpha 0.1")
done
for s in 1 2 3; do list+=("2s3z split behavior_capW $s --map 2s3z --quality split --normalizer behavior --actor-weight-max W --alpha 0.1"); done
for s in 2 3; do list+=("3s_vs_5z medium behavior_capW $s --map 3s_vs_5z --quality medium --normalizer behavior --actor-weight-max W --alpha 0.1"); done
for s in 1 2 3; do list+=("3s_vs_5z mixed behavior_capW $s --map 3s_vs_5z --quality mixed --normalizer behavior --actor-weight-max W --alpha 0.1"); done
for s in 1 2 3; do list+=("2s3z split batch $s --map 2s3z --quality split --alpha 0.1"); done
run_one() {
  line="$1"
  case "$line" in *capW*) line="${line//capW/cap$(cat $LOGS/W)}"; line="${line//-max W /-max $(cat $LOGS/W) }";; esac
  read -r map quality method seed rest <<< "$line"
  name="grid24__${map}-${quality}__${method}__${seed}"
  if [ -f runs/$name/summary.json ] && python -c "import json,sys;sys.exit(0 if json.load(open('runs/$name/summary.json'))['finished'] else 1)"; then return; fi
  if [ -f runs/$name/checkpoint.pt ]; then
    nice -n 5 python -u icq_ma_smac.py --resume runs/$name/checkpoint.pt >> $LOGS/$name.log 2>&1
  else
    extra="--compile"; [ "$method" = bc ] && extra=""   # exact BC: batched critic updates, which --compile refuses
    nice -n 5 python -u icq_ma_smac.py ${common//SEED/$seed} $rest $extra --run-name $name >> $LOGS/$name.log 2>&1
  fi
}
export -f run_one; export common LOGS
# make each dataset once before the workers start (two runs must not record the same file at once)
for q in "2s3z split" "3s_vs_5z mixed"; do
  set -- $q; f=datasets/smax_$1_$2_1000ep_v2.h5
  [ -f $f ] || python -c "
import icq_ma_smac as m, icq_data
_, a = m.make_adapter('smax', '$1', 1); icq_data.generate_smax_dataset(a, '$f', '$2', 1000, seed=0)" > $LOGS/data_$1_$2.log 2>&1
done
printf '%s\n' "${list[@]}" | xargs -P 2 -I{} bash -c 'run_one "{}"'
