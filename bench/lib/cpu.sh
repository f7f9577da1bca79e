# CPU accounting from /proc for the bench/ shell scripts (sourced, not run).
# Ticks are 1/100 s of one core.

# utime + stime of the given pids, summed (pids that are gone count 0)
ticks() { local s=0 p; for p in "$@"; do [ -r "/proc/$p/stat" ] && s=$((s + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $s; }
# every postgres process, plus the postmaster's reaped children (exited backends)
postgres() { local pm; pm=$(pgrep -u postgres -o); echo $(($(ticks $(pgrep -u postgres)) + $(awk '{print $16+$17}' "/proc/$pm/stat"))); }
# the whole host's busy ticks: user, nice, system, irq, softirq (not idle, and
# not iowait, which is idle time with I/O outstanding)
host() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
# the pid of the broker the relay talks to: the process listening on the first
# bootstrap address's port (the tests' cluster may run beside it); exits when
# there is none, rather than measure nothing
broker_pid() {
  local port=${1%%,*} pid
  port=${port##*:}
  pid=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  [ -n "$pid" ] || { echo "$(basename "$0"): no broker listening on port $port (scripts/infra up)" >&2; exit 1; }
  echo "$pid"
}
# fails the script if the relay started as process group $1 has exited (a bad
# setting, a wrong bin=): its figures would otherwise read as a relay's
relay_alive() {
  kill -0 "$1" 2>/dev/null && return 0
  echo "$(basename "$0"): the relay exited; its log ($2):" >&2
  tail -5 "$2" >&2
  exit 1
}
