#!/usr/bin/env bash
# benchmark.sh: the result grids of the three ICQ scripts, run on this machine or on a SLURM cluster.
#
#   bash benchmark.sh learn [options] [extra args]   ICQ vs exact BC (--alpha inf) on every built-in dataset, 3 seeds
#                                                    -> benchmarks/learn.md + benchmarks/learn_<dataset>.png
#   bash benchmark.sh learn --sweep [...]            an --alpha sweep (BC = inf at the large end) on one mixed dataset
#                                                    per script -> benchmarks/sweep.md
#   bash benchmark.sh learn --headline [...]         ICQ-MA vs exact BC on the main command's map, SMAX 3s_vs_5z
#                                                    (medium and strategy-mixed), 3 seeds -> benchmarks/headline.md
#   bash benchmark.sh speed [options] [extra args]   steps/s, peak memory and dataset memory of each script at its
#                                                    standard sizes, beside the floor (the same networks' forward,
#                                                    backward and optimiser steps alone) -> benchmarks/speed.md
#   bash benchmark.sh paper --dry-run                print the seed paper's grid (D4RL, AntMaze, Adroit, SMAC; 5 seeds,
#                                                    full budgets); without --dry-run it runs it (data must be present)
# Options:
#   --launcher local|slurm  local (default): --workers N runs at a time (default 2; speed: 1, so timings do not
#                           collide).
#                           slurm: a job that makes each dataset once, then ONE `sbatch --array` job with one run per
#                           task, then an aggregation job that depends on it; benchmark.sh waits for the aggregation
#                           (--no-wait: return after submitting; --workers N caps the tasks running at once).
#                           --sbatch-args "..." go to every sbatch call (e.g. "--partition cpu --time 04:00:00");
#                           SBATCH_* variables work too. Preemption: the array tasks are requeueable (--requeue) and
#                           ask for SIGUSR1 5 minutes before their time limit (--signal B:USR1@300); a task passes a
#                           SIGUSR1 or SIGTERM on to its run as SIGTERM, the run checkpoints (runs/<run>/checkpoint.pt),
#                           a task at its time limit requeues itself, and a requeued task continues with --resume.
#   --tiny                  a smoke-test grid: one dataset, ICQ and BC, one seed, a few steps; tables go to runs/tiny/
#   --list                  print the runs' command lines and exit (the same as --dry-run)
#   anything else           passed to every run, e.g. --no-cuda or --threads 1
# BENCH_MACHINE_NOTE="..." adds a line about the machine (e.g. its load) to benchmarks/speed.md.
# Every run logs to runs/logs/<run_name>.log as it goes and writes runs/<run_name>/summary.json; the aggregation
# (benchmarks/aggregate.py) reads only the runs of the grid it was given, so a missing run shows as missing. The results
# files name the commit the grid was launched from (runs/lists/<grid>.commit).
set -euo pipefail
cd "$(dirname "$0")"

# --- Learn-grid budgets: about an hour of two cores for `learn`, two hours for `learn --headline` ---------------------
SEEDS="1 2 3"
CONT_STEPS=10000;    CONT_EVAL_INTERVAL=1000; CONT_EVAL_EPISODES=10   # icq_continuous.py, LunarLanderContinuous-v3
DISC_STEPS=10000;    DISC_EVAL_INTERVAL=1000; DISC_EVAL_EPISODES=10   # icq_discrete.py, LunarLander-v3
MA_3M_ITERATIONS=400;   MA_3M_EVAL_INTERVAL=50    # icq_ma_smac.py, SMAX 3m (one iteration = one batch of 32 episodes)
MA_2S3Z_ITERATIONS=100; MA_2S3Z_EVAL_INTERVAL=20  # SMAX 2s3z (its 120-step episodes cost ~8x 3m per iteration)
MA_EVAL_EPISODES=32
# --headline: SMAX 3s_vs_5z, the default sequential critic updates (12 runs, two at a time: about 2 h of 2 cores)
MA_3S5Z_ITERATIONS=3000; MA_3S5Z_EVAL_INTERVAL=300
# --alpha sweeps: a few decades around each script's default, exact BC (inf) at the large end.
SWEEP_SEEDS="1"
CONT_SWEEP_ALPHAS="10 30 100 inf"     # the lunarlander preset signal, Q(s, a)
CONT_TD_SWEEP_ALPHAS="1 3 10 100"    # the authors' TD-error signal (BC, inf, does not depend on the signal)
DISC_SWEEP_ALPHAS="0.1 1 10 100 inf"
MA_SWEEP_ALPHAS="0.01 0.1 1 10 inf"
# --tiny: one discrete dataset, ICQ and BC, one seed, a few steps on a small generated dataset.
TINY_STEPS=20; TINY_DATASET_SIZE=2000
# --- Speed: standard sizes; each measurement is repeated and the median reported -----------------------------------
SPEED_REPEATS=3
SPEED_CONT_STEPS=1000   # Hopper sizes (obs 11, act 3), batch 256, synthetic D4RL-layout HDF5 of 1k and 1M transitions
SPEED_DISC_STEPS=1000   # LunarLander-v3 (obs 8, 4 actions), batch 256, both normalisers
SPEED_MA_ITERATIONS=20  # SMAX 3s_vs_5z, 32 episodes per batch, both critic-update modes
# --- The paper's grid: every script's own defaults / presets are the full budgets ----------------------------------
PAPER_SEEDS="1 2 3 4 5"
# --- SLURM: seconds before a task's time limit at which it checkpoints and requeues itself (sbatch --signal) --------
SLURM_WARNING_SECONDS=300

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# --- Run lists: each function prints one shell command per run; `prepare_*` makes each dataset once, before the grid
# (so parallel runs never generate the same file at the same time). ----------------------------------------------------
ONE_STEP=(--total-steps 1 --eval-interval 1 --eval-episodes 1 --log-interval 1)  # a preparation run: makes the data

run() {  # run NAME SCRIPT ARGS...: one line of the list, extra args appended
  local name=$1 script=$2; shift 2
  printf 'python -u %s' "$script"; printf ' %q' "$@" "${EXTRA[@]}" --run-name "$name"; printf '\n'
}

learn_datasets() {  # script|dataset name|arguments that select it
  if [ "$TINY" = 1 ]; then
    echo "discrete|LunarLander-v3-mixed|--quality mixed --dataset-size $TINY_DATASET_SIZE"
    return
  fi
  for q in mixed medium; do
    echo "continuous|LunarLanderContinuous-v3-$q|--env-id LunarLanderContinuous-v3 --quality $q"
  done
  for q in mixed medium; do echo "discrete|LunarLander-v3-$q|--quality $q"; done
  for map in 3m 2s3z; do for q in good mixed; do echo "ma|$map-$q|--map $map --quality $q"; done; done
}

budget() {  # budget SCRIPT DATASET: the step / evaluation arguments of the learn grid
  if [ "$TINY" = 1 ]; then
    echo "--total-steps $TINY_STEPS --eval-interval $((TINY_STEPS / 2)) --eval-episodes 1 --log-interval 10"
    return
  fi
  local steps interval episodes extra=""
  case $1 in
    continuous) steps=$CONT_STEPS interval=$CONT_EVAL_INTERVAL episodes=$CONT_EVAL_EPISODES ;;
    discrete) steps=$DISC_STEPS interval=$DISC_EVAL_INTERVAL episodes=$DISC_EVAL_EPISODES ;;
    ma)
      episodes=$MA_EVAL_EPISODES extra=" --threads 1"
      case $2 in
        3s_vs_5z*) steps=$MA_3S5Z_ITERATIONS interval=$MA_3S5Z_EVAL_INTERVAL ;;
        2s3z*) steps=$MA_2S3Z_ITERATIONS interval=$MA_2S3Z_EVAL_INTERVAL ;;
        *) steps=$MA_3M_ITERATIONS interval=$MA_3M_EVAL_INTERVAL ;;
      esac ;;
  esac
  echo "--total-steps $steps --eval-interval $interval --eval-episodes $episodes$extra"
}

script_of() {
  case $1 in continuous) echo icq_continuous.py ;; discrete) echo icq_discrete.py ;; ma) echo icq_ma_smac.py ;; esac
}

headline_datasets() { for q in medium mixed; do echo "ma|3s_vs_5z-$q|--map 3s_vs_5z --quality $q"; done; }

sweep_datasets() {  # script|dataset|selection|alphas: one mixed dataset per script
  echo "continuous|LunarLanderContinuous-v3-mixed|--env-id LunarLanderContinuous-v3 --quality mixed|$CONT_SWEEP_ALPHAS"
  echo "continuous|LunarLanderContinuous-v3-mixed-td|--env-id LunarLanderContinuous-v3 --quality mixed" \
    "--actor-signal td|$CONT_TD_SWEEP_ALPHAS"
  echo "discrete|LunarLander-v3-mixed|--quality mixed|$DISC_SWEEP_ALPHAS"
  echo "ma|3m-mixed|--map 3m --quality mixed|$MA_SWEEP_ALPHAS"
}

prepare() {  # prepare learn|sweep|headline: one 1-step run per dataset generates and caches the built-in data
  "${1}_datasets" | while IFS='|' read -r script dataset select _; do
    # shellcheck disable=SC2086
    run "prepare__${script}__${dataset}" "$(script_of "$script")" $select "${ONE_STEP[@]}"
  done
}

learn_runs() {  # learn_runs [learn|headline]: every dataset of the grid, ICQ and BC, each seed
  "${1:-learn}_datasets" | while IFS='|' read -r script dataset select; do
    local seeds=$SEEDS; [ "$TINY" = 1 ] && seeds=1
    for method in icq bc; do for seed in $seeds; do
      local alpha=(); [ "$method" = bc ] && alpha=(--alpha inf)  # ICQ uses the script's default alpha
      # BC's actor never reads the critic (every weight is 1), so ICQ-MA's BC runs take the cheap batched critic updates
      # and the batch softmax (no behaviour model to train)
      [ "$method" = bc ] && [ "$script" = ma ] && alpha+=(--critic-updates batched --normalizer batch)
      # shellcheck disable=SC2086
      run "${1:-learn}__${script}__${dataset}__${method}__${seed}" "$(script_of "$script")" $select \
        $(budget "$script" "$dataset") "${alpha[@]}" --seed "$seed"
    done; done
  done
}

sweep_runs() {
  sweep_datasets | while IFS='|' read -r script dataset select alphas; do
    for alpha in $alphas; do for seed in $SWEEP_SEEDS; do
      # shellcheck disable=SC2086
      run "sweep__${script}__${dataset}__alpha${alpha}__${seed}" "$(script_of "$script")" $select \
        $(budget "$script" "$dataset") --alpha "$alpha" --seed "$seed"
    done; done
  done
}

prepare_learn() { prepare learn; }
prepare_sweep() { prepare sweep; }
prepare_headline() { prepare headline; }
headline_runs() { learn_runs headline; }
prepare_paper() { :; }  # the paper's data is downloaded or recorded beforehand

prepare_speed() {
  echo "python -u benchmarks/aggregate.py make-hopper-data datasets/synthetic-hopper-1k.hdf5 1000"
  echo "python -u benchmarks/aggregate.py make-hopper-data datasets/synthetic-hopper-1M.hdf5 1000000"
  run prepare__discrete__LunarLander-v3-medium icq_discrete.py --quality medium "${ONE_STEP[@]}"
  run prepare__ma__3s_vs_5z-medium icq_ma_smac.py --map 3s_vs_5z --quality medium "${ONE_STEP[@]}" --threads 1
}

speed_runs() {  # speed__<script>__<config>__<icq|floor>__<repeat>; the floor runs benchmarks/aggregate.py floor
  local r data normalizer mode
  for r in $(seq 1 "$SPEED_REPEATS"); do
    for data in 1k 1M; do
      local hopper=(--dataset-path "datasets/synthetic-hopper-$data.hdf5" --env-id Hopper-v5 --batch-size 256)
      run "speed__continuous__hopper-${data}__icq__$r" icq_continuous.py "${hopper[@]}" \
        --total-steps "$SPEED_CONT_STEPS" --eval-interval "$SPEED_CONT_STEPS" --eval-episodes 1 --log-interval 1000
      run "speed__continuous__hopper-${data}__floor__$r" benchmarks/aggregate.py floor continuous "${hopper[@]}" \
        --total-steps "$SPEED_CONT_STEPS"
    done
    for normalizer in batch behavior; do
      local lunar=(--quality medium --normalizer "$normalizer" --batch-size 256)
      run "speed__discrete__lunarlander-${normalizer}__icq__$r" icq_discrete.py "${lunar[@]}" \
        --total-steps "$SPEED_DISC_STEPS" --eval-interval "$SPEED_DISC_STEPS" --eval-episodes 1 --log-interval 1000
      run "speed__discrete__lunarlander-${normalizer}__floor__$r" benchmarks/aggregate.py floor discrete "${lunar[@]}" \
        --total-steps "$SPEED_DISC_STEPS"
    done
    for mode in sequential batched; do
      # the floor (benchmarks/floor.py) has no behaviour model: the authors' batch softmax is timed against it
      local smax=(--map 3s_vs_5z --quality medium --critic-updates "$mode" --normalizer batch --batch-size 32
        --threads 1)
      run "speed__ma__3s_vs_5z-${mode}__icq__$r" icq_ma_smac.py "${smax[@]}" --total-steps "$SPEED_MA_ITERATIONS" \
        --eval-interval "$SPEED_MA_ITERATIONS" --eval-episodes 1 --log-interval 10
      run "speed__ma__3s_vs_5z-${mode}__floor__$r" benchmarks/aggregate.py floor ma "${smax[@]}" \
        --total-steps "$SPEED_MA_ITERATIONS"
    done
    for mode in eager compiled; do  # issue 25: the same iterations timed inside the loop, compile time apart
      run "speed__ma__3s_vs_5z-steady-${mode}__icq__$r" benchmarks/compile_speed.py "$mode" --map 3s_vs_5z \
        --quality medium --normalizer batch --batch-size 32 --threads 1 --iterations "$SPEED_MA_ITERATIONS" \
        --eval-episodes 1
    done
  done
}

paper_runs() {
  # D4RL locomotion: Minari holds only Gymnasium-v5 regenerations (mujoco/*), not the paper's data, so the original
  # D4RL v2 files are read with --dataset-path (download them into datasets/d4rl/) and evaluated in the v5 envs.
  local seed task data id map
  for seed in $PAPER_SEEDS; do
    for task in hopper halfcheetah walker2d; do for data in medium medium-replay medium-expert; do
      local env
      case $task in hopper) env=Hopper-v5 ;; halfcheetah) env=HalfCheetah-v5 ;; walker2d) env=Walker2d-v5 ;; esac
      run "paper__continuous__$task-$data-v2__icq__$seed" icq_continuous.py \
        --dataset-path "datasets/d4rl/$task-$data-v2.hdf5" --env-id "$env" --seed "$seed"
    done; done
    # AntMaze (six datasets) and Adroit (four tasks x human/cloned) through Minari's D4RL re-creations.
    for id in antmaze/umaze-v1 antmaze/umaze-diverse-v1 antmaze/medium-play-v1 antmaze/medium-diverse-v1 \
              antmaze/large-play-v1 antmaze/large-diverse-v1 pen/human-v2 pen/cloned-v2 hammer/human-v2 \
              hammer/cloned-v2 door/human-v2 door/cloned-v2 relocate/human-v2 relocate/cloned-v2; do
      run "paper__continuous__${id//\//-}__icq__$seed" icq_continuous.py --dataset-id "D4RL/$id" --seed "$seed"
    done
    # SMAC (StarCraft II 4.10) with PyMARL episode files recorded on the same build: datasets/smac/<map>.h5.
    for map in 3s_vs_5z 2s3z 3s5z 5m_vs_6m 6h_vs_8z 2c_vs_64zg MMM2 corridor; do
      run "paper__ma__${map}__icq__$seed" icq_ma_smac.py --env-backend smac --map "$map" \
        --dataset-path "datasets/smac/$map.h5" --seed "$seed"
    done
  done
}

# --- Launchers ------------------------------------------------------------------------------------------------------
describe_commit() {  # the commit the runs are launched from (the results files name it)
  local head
  head=$(git rev-parse --short HEAD 2>/dev/null) || { echo "unknown (not a git checkout)"; return; }
  if [ -n "$(git status --porcelain -- 'icq_*.py' benchmark.sh 'benchmarks/*.py' 2>/dev/null)" ]; then
    echo "$head, with uncommitted changes to the scripts"
  else
    echo "$head"
  fi
}

forward() {  # forward NAME SIGNAL: a trap of task(); notes the signal and passes SIGNAL on to the run, once it runs
  got=$1
  if [ -n "$pid" ]; then kill -"$2" "$pid" 2>/dev/null || true; fi
}

task() {  # task LIST INDEX: run line INDEX of LIST, logging to runs/logs/<run_name>.log
  local line name start rc=0 pid="" checkpoint log signal="" got="" status
  # The run is this shell's child, so a signal for the task reaches it: SIGTERM (preemption, scontrol requeue, scancel)
  # and SIGUSR1 (sbatch --signal before the time limit) go on to the run as SIGTERM, SIGINT as SIGINT; the run finishes
  # the current update, writes its checkpoint and summary, and exits 128 + the signal's number.
  trap 'forward TERM TERM' TERM
  trap 'forward USR1 TERM' USR1
  trap 'forward INT INT' INT
  line=$(sed -n "${2}p" "$1")
  name=$(grep -o -- '--run-name [^ ]*' <<<"$line" | cut -d' ' -f2) || name=$(basename "$1" .txt)_$2
  checkpoint=runs/$name/checkpoint.pt log=runs/logs/$name.log
  mkdir -p runs/logs
  # A run of this launch that already finished (a task restarted after its run ended) is not run again.
  if [ -f "runs/$name/summary.json" ] && [ "runs/$name/summary.json" -nt "$1" ] &&
    grep -q '"finished": true' "runs/$name/summary.json"; then
    echo "done $name (it finished before this task started), log $log"
    return 0
  fi
  # A checkpoint written after LIST is this launch's run, interrupted (a requeued or restarted task): continue it. An
  # older one is a previous launch's, which the new run replaces.
  if [ -f "$checkpoint" ] && [ "$checkpoint" -nt "$1" ]; then
    line+=" --resume $checkpoint"
    echo "resuming $name from $checkpoint (SLURM restart count ${SLURM_RESTART_COUNT:-0})" >>"$log"
  else
    : >"$log"
  fi
  start=$(date +%s)
  PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} bash -c "exec $line" >>"$log" 2>&1 &
  pid=$!
  if [ -n "$got" ]; then signal=$got; kill -TERM "$pid"; fi  # a signal that came before the run started
  while :; do  # a trapped signal ends `wait` early: wait again for the run's own exit status
    got="" status=0
    wait "$pid" || status=$?
    [ "$status" = 127 ] || rc=$status
    [ -n "$got" ] || break
    signal=$got
  done
  trap - TERM USR1 INT
  local outcome=done
  if [ "$rc" != 0 ]; then
    outcome="FAILED (exit $rc)"
    if [ -n "$signal" ]; then outcome="interrupted (SIG$signal, exit $rc)"; fi
  fi
  echo "$outcome $name in $(($(date +%s) - start))s, log $log"
  if [ "$signal" = USR1 ] && [ -f "$checkpoint" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    # The time-limit warning: SLURM requeues only preempted or failed tasks, so this one requeues itself. The requeue
    # kills this shell at once, so the outcome line above comes first.
    local job=$SLURM_JOB_ID  # an array task by its array name (the last task's SLURM_JOB_ID names the whole array)
    [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && job=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
    echo "requeueing $name at its time limit (checkpoint $checkpoint)" >>"$log"
    scontrol requeue "$job" || echo "warning: scontrol requeue $job failed" >&2
  fi
  return $rc
}

aggregate() {  # aggregate SUBCOMMAND LIST
  local out=benchmarks; [ "$TINY" = 1 ] && out=runs/tiny
  python -u benchmarks/aggregate.py "$1" "$2" --out-dir "$out"
}

launch() {  # launch SUBCOMMAND PREPARE_LIST RUN_LIST
  local n_prep n_runs; n_prep=$(wc -l <"$2"); n_runs=$(wc -l <"$3")
  echo "$1: $n_prep preparation runs, then $n_runs runs ($3); launcher $LAUNCHER"
  if [ "$LAUNCHER" = local ]; then
    local rc=0
    seq 1 "$n_prep" | xargs -r -P "$WORKERS" -I{} bash benchmark.sh _task "$2" {} || rc=1
    seq 1 "$n_runs" | xargs -r -P "$WORKERS" -I{} bash benchmark.sh _task "$3" {} || rc=1
    aggregate "$1" "$3"
    return $rc
  fi
  command -v sbatch >/dev/null || { echo "error: --launcher slurm needs sbatch on PATH" >&2; exit 1; }
  local limit="" prep main tiny=""; [ -n "$WORKERS" ] && limit="%$WORKERS"; [ "$TINY" = 1 ] && tiny=--tiny
  mkdir -p runs/slurm
  local common=(--parsable --chdir "$PWD" --output "runs/slurm/%x_%A_%a.out") after=() rc=0 agg
  # Requeueable, and warned before the time limit (a user's own --signal in --sbatch-args comes later and wins); the
  # task's shell is the batch shell (exec), so the warning (B:) reaches it; a requeued task appends to its output.
  local preemptible=(--requeue --signal "B:USR1@$SLURM_WARNING_SECONDS" --open-mode append)
  # shellcheck disable=SC2086
  if [ "$n_prep" -gt 0 ]; then  # one job makes each dataset once, one after the other
    prep=$(sbatch "${common[@]}" --requeue $SBATCH_ARGS --job-name "icq-$1-prepare" --output "runs/slurm/%x_%j.out" \
      --wrap "for i in \$(seq 1 $n_prep); do bash benchmark.sh _task $2 \$i; done")
    after=(--dependency "afterany:${prep%%;*}")
  fi
  # shellcheck disable=SC2086
  main=$(sbatch "${common[@]}" "${preemptible[@]}" $SBATCH_ARGS --job-name "icq-$1" "${after[@]}" \
    --array "1-$n_runs$limit" --wrap "exec bash benchmark.sh _task $3 \$SLURM_ARRAY_TASK_ID")
  echo "submitted array job ${main%%;*} (one task per run); logs in runs/logs/, the aggregation job runs after it"
  # shellcheck disable=SC2086
  agg=$(sbatch "${common[@]}" $SBATCH_ARGS $WAIT --job-name "icq-$1-aggregate" --output "runs/slurm/%x_%j.out" \
    --dependency "afterany:${main%%;*}" --wrap "bash benchmark.sh _aggregate $1 $3 $tiny") || rc=$?
  agg=${agg%%;*}
  if [ -n "$WAIT" ]; then cat "runs/slurm/icq-$1-aggregate_$agg.out"; else echo "aggregation job $agg"; fi
  return $rc
}

# --- Command line -----------------------------------------------------------------------------------------------------
cmd=${1:-}; [ $# -gt 0 ] && shift
case $cmd in
  _task) task "$@"; exit ;;
  -h | --help | help | "") usage; exit 0 ;;
esac
LAUNCHER=local WORKERS="" TINY=0 SWEEP=0 HEADLINE=0 DRY_RUN=0 WAIT=--wait SBATCH_ARGS="" EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --launcher) LAUNCHER=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --sweep) SWEEP=1; shift ;;
    --headline) HEADLINE=1; shift ;;
    --dry-run | --list) DRY_RUN=1; shift ;;
    --no-wait) WAIT=""; shift ;;
    --sbatch-args) SBATCH_ARGS=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
case $LAUNCHER in
  local | slurm) ;;
  *) echo "error: --launcher must be local or slurm (got $LAUNCHER)" >&2; exit 2 ;;
esac
if [ "$cmd" = _aggregate ]; then aggregate "${EXTRA[@]:0:2}"; exit; fi
[ "$LAUNCHER" = local ] && [ -z "$WORKERS" ] && { WORKERS=2; [ "$cmd" = speed ] && WORKERS=1; }
[ "$cmd" = learn ] && [ "$SWEEP" = 1 ] && cmd=sweep
[ "$cmd" = learn ] && [ "$HEADLINE" = 1 ] && cmd=headline
case $cmd in
  learn | sweep | headline | speed | paper) ;;
  *) echo "error: unknown subcommand '$cmd' (see bash benchmark.sh --help)" >&2; exit 2 ;;
esac

if [ "$DRY_RUN" = 1 ]; then
  "prepare_$cmd"
  "${cmd}_runs"
  exit 0
fi
mkdir -p runs/lists
suffix=""; [ "$TINY" = 1 ] && suffix=_tiny
prep_list=runs/lists/$cmd${suffix}_prepare.txt run_list=runs/lists/$cmd$suffix.txt
"prepare_$cmd" >"$prep_list"
"${cmd}_runs" >"$run_list"
describe_commit >"${run_list%.txt}.commit"
launch "$cmd" "$prep_list" "$run_list"
