#!/usr/bin/env bash
# A single-node Slurm cluster (a controller and one compute node: this machine) for the `slow` test of
# executor slurm (tests/test_executors.py::test_real_slurm_single_node), or to try a sweep's job array.
#
#   tests/slurm_single_node.sh start DIR     # prints: export SLURM_CONF=DIR/slurm.conf
#   tests/slurm_single_node.sh stop DIR
#
# Needs root, Slurm and munge (Debian/Ubuntu: apt-get install slurm-wlm). Uses ports $SLURM_TEST_PORT and
# +1 (default 16817), state and logs under DIR; starts munged if it is not running.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(realpath -m "${2:?directory}")
case "$cmd" in
start)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  if ! munge -n >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged --force
    for _ in $(seq 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  port=${SLURM_TEST_PORT:-16817}
  cat > "$dir/slurm.conf" <<CONF
ClusterName=llmmemtest
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$port
SlurmdPort=$((port + 1))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$((mem * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -c
  slurmd
  for _ in $(seq 60); do
    sinfo -h -o %t 2>/dev/null | grep -qx idle && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.5
  done
  echo "slurm did not come up; see $dir/log" >&2
  exit 1
  ;;
stop)
  export SLURM_CONF="$dir/slurm.conf"
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 60); do  # let job steps report back before the daemons go
    [ -z "$(squeue -h 2>/dev/null)" ] && break
    sleep 0.5
  done
  sleep 1
  for f in slurmd slurmctld; do
    [ -f "$dir/$f.pid" ] && kill "$(cat "$dir/$f.pid")" 2>/dev/null || true
  done
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
