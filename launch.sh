#!/usr/bin/env bash
# Run a recipe on several processes (GPUs, or CPU processes over gloo) and nodes with torchrun.
#
#   ./launch.sh NPROC RECIPE.yaml [key=value ...]                                   one machine
#   ./launch.sh NPROC RECIPE.yaml --nnodes N --node-rank R --master ADDR:PORT [key=value ...]   node R of N
#
# Every process runs `python -m glmtune train`; accelerate turns them into one data-parallel job (DDP; NCCL on
# GPUs, gloo on CPUs). The data stream is split by rank; the loss is normalised over the global batch, so
# NPROC processes with train.batch_size=B give the same updates as one process with batch_size=NPROC*B.
# The exact command is printed before it runs.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
nproc=$1; recipe=$2; shift 2
nnodes=1; node_rank=0; master="127.0.0.1:29500"; overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master) master=$2; shift 2 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
case "$nproc" in ''|*[!0-9]*) echo "launch.sh: NPROC must be a number, got '$nproc'" >&2; exit 2 ;; esac
[ -f "$recipe" ] || { echo "launch.sh: recipe file not found: $recipe" >&2; exit 2; }
cmd=(torchrun --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
     --master_addr "${master%:*}" --master_port "${master##*:}" -m glmtune train "$recipe" "${overrides[@]}")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
