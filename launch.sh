#!/usr/bin/env bash
# Run a recipe on several processes (GPUs, or CPU processes over gloo) and nodes.
#
#   ./launch.sh NPROC RECIPE.yaml [key=value ...]                                   one machine
#   ./launch.sh NPROC RECIPE.yaml --nnodes N --node-rank R --master ADDR:PORT [key=value ...]   node R of N
#   options: --launcher torchrun|accelerate|deepspeed (default torchrun)
#            --accelerate-config FILE   with --launcher accelerate (default configs/accelerate/ddp.yaml)
#            --hostfile FILE            with --launcher deepspeed: DeepSpeed's `host slots=N` lines
#
# NPROC is the number of processes per node. Every process runs `python -m glmtune train`; accelerate turns them
# into one data-parallel job (NCCL on GPUs, gloo on CPUs), under the recipe's train.distributed (DDP, or DeepSpeed
# ZeRO), or the DeepSpeed config of --accelerate-config configs/accelerate/zero*.yaml. The data stream is split by
# rank; the loss is normalised over the global batch, so NPROC processes with train.batch_size=B give the same
# updates as one process with batch_size=NPROC*B. With several nodes, run launch.sh on every node (node ranks
# 0..N-1; the deepspeed launcher takes the node list from --hostfile and starts no ssh). The exact command is
# printed before it runs.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
die() { echo "launch.sh: $*" >&2; exit 2; }
nproc=$1; recipe=$2; shift 2
nnodes=""; node_rank=0; master="127.0.0.1:29500"; launcher=torchrun; acc_config=""; hostfile=""; overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes|--node-rank|--master|--launcher|--accelerate-config|--hostfile)
      [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master) master=$2; shift 2 ;;
    --launcher) launcher=$2; shift 2 ;;
    --accelerate-config) acc_config=$2; shift 2 ;;
    --hostfile) hostfile=$2; shift 2 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
case "$nproc" in ''|*[!0-9]*) die "NPROC must be a number, got '$nproc'" ;; esac
[ -f "$recipe" ] || die "recipe file not found: $recipe"
case "$launcher" in
  torchrun|accelerate|deepspeed) ;;
  *) die "--launcher must be torchrun, accelerate or deepspeed, got '$launcher'" ;;
esac
if [ -n "$hostfile" ] && [ "$launcher" != deepspeed ]; then
  die "--hostfile is for --launcher deepspeed; with $launcher run launch.sh on every node with" \
      "--nnodes N --node-rank R --master ADDR:PORT (the same command, its own node rank)"
fi
if [ -n "$acc_config" ] && [ "$launcher" != accelerate ]; then
  die "--accelerate-config is for --launcher accelerate (got --launcher $launcher)"
fi
if [ "$launcher" != torchrun ]; then  # torchrun also takes an elastic range MIN:MAX
  for v in "${nnodes:-1}" "$node_rank"; do
    case "$v" in ''|*[!0-9]*) die "--nnodes and --node-rank must be numbers with --launcher $launcher, got '$v'" ;; esac
  done
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
addr=${master%:*}; port=${master##*:}

case "$launcher" in
  torchrun)
    cmd=(torchrun --nnodes "${nnodes:-1}" --node_rank "$node_rank" --nproc_per_node "$nproc"
         --master_addr "$addr" --master_port "$port" -m glmtune train "$recipe" "${overrides[@]}") ;;
  accelerate)
    acc_config=${acc_config:-$here/configs/accelerate/ddp.yaml}
    [ -f "$acc_config" ] || die "accelerate config not found: $acc_config"
    # accelerate counts processes over all machines
    cmd=(accelerate launch --config_file "$acc_config" --num_processes "$((nproc * ${nnodes:-1}))"
         --num_machines "${nnodes:-1}" --machine_rank "$node_rank" --main_process_ip "$addr"
         --main_process_port "$port" -m glmtune train "$recipe" "${overrides[@]}") ;;
  deepspeed)
    # --no_local_rank: glmtune takes no --local_rank argument; its ranks come through the environment (as with torchrun)
    if [ -z "$hostfile" ]; then
      [ "${nnodes:-1}" = 1 ] || die "--launcher deepspeed with --nnodes ${nnodes} needs --hostfile FILE (one" \
                                    "\`host slots=N\` line per node)"
      cmd=(deepspeed --num_gpus "$nproc" --master_addr "$addr" --master_port "$port" --no_local_rank
           --module glmtune train "$recipe" "${overrides[@]}")
    else
      [ -f "$hostfile" ] || die "hostfile not found: $hostfile"
      hosts=0
      while IFS= read -r line || [ -n "$line" ]; do
        read -r host slots _ <<< "$line" || true
        case "$host" in ''|'#'*) continue ;; esac
        case "$slots" in slots=*) n=${slots#slots=} ;; *) n="" ;; esac
        case "$n" in ''|*[!0-9]*) die "$hostfile: bad line '$line' (DeepSpeed's format: \`host slots=N\`)" ;; esac
        [ "$n" -ge "$nproc" ] || die "$hostfile: $host has $n slots, fewer than NPROC=$nproc"
        hosts=$((hosts + 1))
      done < "$hostfile"
      [ "$hosts" -gt 0 ] || die "$hostfile lists no host"
      [ -z "$nnodes" ] || [ "$nnodes" = "$hosts" ] || die "--nnodes $nnodes, but $hostfile lists $hosts hosts"
      [ "$node_rank" -lt "$hosts" ] || die "--node-rank $node_rank, but $hostfile lists $hosts hosts" \
                                          "(ranks 0..$((hosts - 1)))"
      # --no_ssh: like torchrun, launch.sh runs on every node with its own --node-rank (no pdsh/ssh needed);
      # NPROC processes per host (--num_gpus)
      cmd=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --num_gpus "$nproc"
           --master_addr "$addr" --master_port "$port" --no_local_rank
           --module glmtune train "$recipe" "${overrides[@]}")
    fi ;;
esac
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
