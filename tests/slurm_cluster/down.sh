#!/usr/bin/env bash
# down.sh - stop the cluster started by up.sh: cancel its jobs, then kill ONLY the PIDs recorded in
# $SLURM_TEST_DIR/pids (after checking each still runs the expected binary), undo the /etc/hosts line.
set -uo pipefail
D=${SLURM_TEST_DIR:?set SLURM_TEST_DIR}
export SLURM_CONF=$D/slurm.conf

alive() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }
our_stepds() {  # slurmstepds of OUR slurmds (they inherit SLURM_CONF=$D/slurm.conf)
  local p
  for p in $(ps -eo pid=,comm= | awk '$2 ~ /^slurmstepd/ {print $1}'); do
    tr '\0' '\n' 2>/dev/null < "/proc/$p/environ" | grep -qxF "SLURM_CONF=$D/slurm.conf" && echo "$p"
  done
}

if [ -f "$D/pids/slurmctld.pid" ] && alive "$(cat "$D/pids/slurmctld.pid")"; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  [ -n "${jobs// }" ] && scancel $jobs 2>/dev/null
  for _ in $(seq 1 300); do
    [ "$(squeue -h 2>/dev/null | wc -l)" = 0 ] && [ -z "$(our_stepds)" ] && break
    sleep 0.2
  done
fi

stop() {  # expected-comm pid-file-name...: TERM, wait up to 10 s, then KILL
  local comm=$1; shift; local n f pid pids=()
  for n in "$@"; do
    f=$D/pids/$n.pid; [ -f "$f" ] || continue; pid=$(cat "$f"); rm -f "$f"
    if alive "$pid" && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$comm" ]; then kill -TERM "$pid"; pids+=("$pid"); fi
  done
  for _ in $(seq 1 100); do
    local any=0 p; for p in "${pids[@]}"; do alive "$p" && any=1; done
    [ "$any" = 0 ] && break; sleep 0.1
  done
  local p; for p in "${pids[@]}"; do alive "$p" && kill -KILL "$p"; done
  return 0
}
mapfile -t slurmds < <(ls "$D"/pids/ 2>/dev/null | sed -n 's/^\(slurmd\..*\)\.pid$/\1/p')
stop slurmd "${slurmds[@]}"
stop slurmctld slurmctld
stop munged munged

if grep -qF "# slurm_test:$D" /etc/hosts 2>/dev/null; then
  tmp=$(grep -vF "# slurm_test:$D" /etc/hosts); printf '%s\n' "$tmp" > /etc/hosts
fi
left=$(our_stepds | tr '\n' ' ')
[ -n "${left// }" ] && echo "down.sh: WARNING: slurmstepd processes of this cluster still present: $left" >&2
echo "[slurm down] done"
