#!/usr/bin/env bash
# The GPU measurements of docs/speed.md, in one go, on a machine with a CUDA GPU:
#   bash scripts/bench_gpu.sh OUT_DIR
# 1. training time of the original README's presets at R = 1 ... 4096 replicates (scripts/bench.py);
# 2. host synchronisations per epoch of CUDA training (bench.py --sync-check);
# 3. the same presets on this machine's CPUs at large R, for the ratio;
# 4. the sample-efficiency study (experiment=sample_efficiency, 135 jobs x 16 seeds) on the GPU and
#    on the CPUs, each with the joblib launcher, timed and aggregated.
# Each stage has its own time limit (seconds, the variables below) so that one slow stage cannot
# take the others' time. Tables go to stdout; JSON, logs and the aggregated CSV to OUT_DIR.
# DEVICE=cpu REPLICATES="1 8" SE=0 bash scripts/bench_gpu.sh /tmp/x  tries the script on any machine.
set -u
out=${1:?usage: bash scripts/bench_gpu.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
replicates=${REPLICATES:-1 32 256 1024 4096}
cases=${CASES:-modular modular_known shared shared_known mlp}
gpu_jobs=${GPU_JOBS:-8}  # sample-efficiency jobs at once on the GPU (processes sharing it)
export PYTHONUNBUFFERED=1 WANDB_SILENT=true
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > >(tee "$out/$name.log") 2>&1
  echo "== $name: exit $?, $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'cpus', __import__('os').cpu_count())"

# shellcheck disable=SC2086
stage train_gpu "${LIMIT_TRAIN:-200}" $py scripts/bench.py --device "$device" --replicates $replicates --cases $cases \
  --repeats "${REPEATS:-2}" --cli-replicates --out "$out/train_gpu.json"
[ "$device" = cuda ] && stage sync_check "${LIMIT_SYNC:-40}" $py scripts/bench.py --sync-check --replicates 32 \
  --cases modular shared mlp --out "$out/sync_check.json"
stage train_cpu "${LIMIT_CPU:-70}" $py scripts/bench.py --device cpu --replicates ${CPU_REPLICATES:-1024 4096} --cases modular \
  --cli-replicates --out "$out/train_cpu.json"
if [ "${SE:-1}" = 1 ]; then
  for dev in "$device" cpu; do
    dir=$out/se_$dev jobs=$gpu_jobs limit=${LIMIT_SE_GPU:-120}
    [ "$dev" = cpu ] && jobs=$(nproc) limit=${LIMIT_SE_CPU:-80}
    start=$SECONDS
    stage "se_$dev" "$limit" $py -m modnets.train experiment=sample_efficiency trainer.device="$dev" \
      hydra/launcher=joblib hydra.launcher.n_jobs="$jobs" hydra.sweep.dir="$dir"
    pkill -f loky 2>/dev/null  # workers of a sweep stopped at its limit
    echo "sample-efficiency on $dev: $(find "$dir" -name results.json | wc -l) results files in $((SECONDS - start)) s"
    $py scripts/aggregate.py "$dir" --no-plots --out "$out/aggregate_$dev" | tail -n 25
  done
fi
