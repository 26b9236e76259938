#!/usr/bin/env bash
# ICQ-MA's speed on a GPU, one call of at most about 5 minutes (issue 25): seconds per iteration of the main command's
# map (SMAX 3s_vs_5z, 32 episodes per batch, the default sequential critic steps) eager, with --compile, and with
# --compile plus CUDA graphs, the GPU memory, and the 40,000-iteration projection, measured inside the training loop by
# benchmarks/compile_speed.py. The dataset is recorded with 200 episodes (the batch, and so the iteration, is the
# default's; only the file is smaller, so that recording it fits the call). Writes $OUT/speed_gpu.md (or
# benchmarks/speed_gpu.md without $OUT) and the runs' summaries beside it.
#   bash benchmarks/gpu_speed.sh [--iterations N] [extra icq_ma_smac.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
args=(--map 3s_vs_5z --quality medium --dataset-size 200 --eval-episodes 8 --iterations 20 --warmup 3 "$@")
python -u icq_data.py smax --map 3s_vs_5z --quality medium --dataset-size 200
for mode in eager compiled cudagraphs; do
  timeout 240 python -u benchmarks/compile_speed.py "$mode" "${args[@]}" --run-name "gpu_speed_$mode" \
    > "$out/gpu_speed_$mode.log" 2>&1 || echo "$mode: failed or timed out (see $out/gpu_speed_$mode.log)"
  tail -n 25 "$out/gpu_speed_$mode.log"
done
summaries=(); for mode in eager compiled cudagraphs; do
  f=runs/gpu_speed_$mode/summary.json; [ -f "$f" ] && grep -q seconds_per_iteration "$f" && summaries+=("$f")
done
{ echo "# ICQ-MA on a GPU: eager, --compile, --compile with CUDA graphs"; echo
  echo "Made by \`bash benchmarks/gpu_speed.sh\` at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo; python benchmarks/compile_speed.py table "${summaries[@]}"; } > "$out/speed_gpu.md"
for mode in eager compiled cudagraphs; do cp "runs/gpu_speed_$mode/summary.json" "$out/gpu_speed_$mode.json" 2>/dev/null || true; done
cat "$out/speed_gpu.md"
