#!/usr/bin/env bash
# up.sh - a throwaway Slurm cluster on this host for the Slurm tests (Debian 12 / Slurm 22.05, root,
# no systemd). N fake nodes = N `slurmd -N <name>` daemons on distinct ports of 127.0.0.1 (Debian's
# Slurm is built with MULTIPLE_SLURMD). Installs slurmctld/slurmd/slurm-client/munge with apt-get
# when missing. Everything (config, state, logs, munge key and socket, pid files) lives under
# $SLURM_TEST_DIR; afterwards `source $SLURM_TEST_DIR/env.sh` (exports SLURM_CONF). Stop with down.sh,
# which kills only the PIDs recorded here.
set -euo pipefail

D=${SLURM_TEST_DIR:?set SLURM_TEST_DIR to a private directory}
NODES=${SLURM_TEST_NODES:-2}
PREFIX=${SLURM_TEST_NODE_PREFIX:-sfnode}      # node names: ${PREFIX}1..N (resolved via /etc/hosts)
CPUS=${SLURM_TEST_CPUS_PER_NODE:-2}           # may exceed real cores (config_overrides)
MEM_MB=${SLURM_TEST_MEM_PER_NODE_MB:-8000}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-16917}
SLURMD_BASE_PORT=${SLURM_TEST_SLURMD_BASE_PORT:-17200}   # node i listens on BASE+i
CRED_EXPIRE=${SLURM_TEST_CRED_EXPIRE:-10}     # also the delay before a requeued job may start again

t0=$(date +%s.%N)
ts() { awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$*" 'BEGIN{printf "[slurm up %6.1fs] %s\n", b-a, m}'; }

# ---- 1. packages (a missing apt-get is a failure: the Slurm tests must be real)
need=0; for b in slurmd slurmctld sbatch munged mungekey ps; do command -v $b >/dev/null || need=1; done
if [ "$need" = 1 ]; then
  ts "installing slurmctld slurmd slurm-client munge procps"
  added_policy=0   # keep the packages' postinst from starting daemons through init scripts
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge procps >/dev/null
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  ts "installed: $(slurmd -V)"
fi

# ---- 2. layout: fresh state every time (job ids restart at 1)
if ls "$D"/pids/*.pid >/dev/null 2>&1; then
  echo "$D/pids has pid files: run down.sh first" >&2; exit 1
fi
rm -rf "$D/state" "$D/spool" "$D/log"
mkdir -p "$D"/{state,log,pids,munge,spool}
chmod 700 "$D/munge"
for i in $(seq 1 "$NODES"); do mkdir -p "$D/spool/$PREFIX$i"; done

# ---- 3. munge: private key and socket
[ -f "$D/munge/munge.key" ] || mungekey -c -k "$D/munge/munge.key"
chmod 400 "$D/munge/munge.key"
SOCK=$D/munge/munge.socket
setsid /usr/sbin/munged -F --force --key-file="$D/munge/munge.key" --socket="$SOCK" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" \
    </dev/null >>"$D/log/munged.stdout" 2>&1 &
echo $! > "$D/pids/munged.pid"
for _ in $(seq 1 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null
ts "munged up"

# ---- 4. slurm.conf
cat > "$D/slurm.conf" <<CONF
ClusterName=shardforgetest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/state/slurmctld.pid
SlurmdPidFile=$D/spool/%n/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=600
KillWait=30
OverTimeLimit=0
Waittime=0
NodeName=$PREFIX[1-$NODES] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=[$((SLURMD_BASE_PORT + 1))-$((SLURMD_BASE_PORT + NODES))] CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF=$D/slurm.conf
echo "export SLURM_CONF=$D/slurm.conf" > "$D/env.sh"

# ---- 5. daemons (foreground mode, backgrounded; PIDs recorded for down.sh)
setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$D/log/slurmctld.stdout" 2>&1 &
echo $! > "$D/pids/slurmctld.pid"
for i in $(seq 1 "$NODES"); do
  setsid /usr/sbin/slurmd -D -N "$PREFIX$i" -f "$SLURM_CONF" </dev/null >>"$D/log/slurmd.$PREFIX$i.stdout" 2>&1 &
  echo $! > "$D/pids/slurmd.$PREFIX$i.pid"
done
ok=0
for _ in $(seq 1 120); do
  if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | grep -c ' idle$')" = "$NODES" ]; then ok=1; break; fi
  sleep 0.25
done
if [ "$ok" != 1 ]; then
  echo "nodes did not become idle (run down.sh):" >&2; sinfo -N -l >&2 || true; tail -n 20 "$D"/log/*.log >&2; exit 1
fi
ts "slurmctld + $NODES slurmd up, all nodes idle"

# ---- 6. the fake node names resolve to 127.0.0.1 (rendezvous endpoints use them)
line="127.0.0.1 $(seq -f "$PREFIX%g" -s ' ' 1 "$NODES") # slurm_test:$D"
grep -qF "# slurm_test:$D" /etc/hosts || echo "$line" >> /etc/hosts   # append, no sed -i (bind mounts)
ts "cluster ready: source $D/env.sh"
