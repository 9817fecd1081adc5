# deployctl's remote agent, protocol 1. Compiled into deployctl and sent
# with every command, so nothing is installed on the hosts:
#
#   sh -c '<this script>' deployctl-agent VERB [OPTIONS...]
#
# Needs a POSIX sh and, on the host, Linux /proc, setsid (util-linux or
# busybox), tail, grep with -z (GNU or busybox), and a sleep that takes
# fractions (GNU or busybox; else it polls once a second).
#
# Answers (stdout, one line, fields separated by single spaces):
#   DEPLOYCTL-AGENT/1 hello addr=A boot=B
#   DEPLOYCTL-AGENT/1 start port=P pid=N starttime=T boot=B log=PATH
#   DEPLOYCTL-AGENT/1 inspect state=alive|dead pid=N starttime=T found=pid|tag|none boot=B
#                     (one such line per instance asked about, in order)
#   DEPLOYCTL-AGENT/1 stop result=stopped|killed|gone pid=N
#                     (one such line per instance asked about, in order)
#   DEPLOYCTL-AGENT/1 prune removed=N rotated=N freed=BYTES
#   DEPLOYCTL-AGENT/1 error CODE MESSAGE          (exit status 3)
# `logs` prints the log's lines themselves (exit 0), or the error line.
# starttime is field 22 of /proc/PID/stat; boot is
# /proc/sys/kernel/random/boot_id: (pid, starttime, boot) names one process.
# The agent never exits 255, which is ssh's own failure status.
#
# Verbs:
#   hello
#     Checks that this host can run instances (setsid, tail, grep, /proc)
#     and answers the address the ssh client reached it on (the third
#     field of SSH_CONNECTION) and the boot id.
#   start --tag TAG --ports LOW-HIGH [--exclude P,P,...] --log PATH
#         --version V --target T [--workdir DIR] -- COMMAND
#     Picks a port in LOW-HIGH that no TCP socket uses (from /proc/net/tcp
#     and tcp6, any state but TIME_WAIT; `ss -Htan` when /proc/net is not
#     readable), not in --exclude, and not handed out by another start in
#     the last RESERVE_S seconds; appends to the log (its directory made);
#     runs `sh -c COMMAND` ({port} replaced) detached: its own session
#     (setsid), stdin /dev/null, stdout and stderr appended to the log.
#     Its environment: ours (the ssh session's), then NAME=value lines read
#     from stdin (values escaped for printf %b: \\ \n \0ooo), then
#     DEPLOY_INSTANCE=TAG DEPLOY_PORT DEPLOY_VERSION DEPLOY_TARGET.
#     Secrets therefore travel on stdin, never in an argv that `ps` shows,
#     and ${NAME} in COMMAND is expanded by the instance's own shell from
#     its environment.
#   inspect --tag TAG [--pid N --starttime T --boot B] [--tag TAG ...]
#     alive when that process still runs; else the live process carrying
#     DEPLOY_INSTANCE=TAG (the session leader first), found=tag; else dead.
#     Each --tag begins the next instance: one answer line each, in order
#     (all of them checked before any is answered).
#   stop --pid N --starttime T --boot B [--pid N ...] [--timeout-ms MS]
#     SIGTERM to each instance's process group, SIGKILL after MS (default
#     10000), until no member is left; every instance at once, one answer
#     line each, in order (a field given twice begins the next instance).
#     A pid that now names another process (start time or boot differs) is
#     never signalled: result=gone.
#   prune --dir DIR --target T [--max-bytes N] [--drop VERSION ...]
#     Retention (runtime/logprune.h does the same on the deploy machine):
#     deletes T's logs DIR/T-VERSION-N.log (and .log.1) of each dropped
#     VERSION unless written in the last 10 seconds; rotates every other
#     log of T over N bytes (copied to .log.1, then truncated).
#   logs --log PATH [--lines N] [--follow]
#     The last N lines (default 100); --follow keeps printing until stdin
#     reaches EOF (ssh closes it when the caller goes away).

PROTO='DEPLOYCTL-AGENT/1'
RESERVE_S=30
NL='
'
umask 027

fail() {
  code=$1
  shift
  printf '%s error %s %s\n' "$PROTO" "$code" "$*"
  exit 3
}

# Option values must be one printable line: they reach log headers and
# answers.
check_value() {
  case $2 in
    *[![:print:]]*) fail usage "$1 holds a control character";;
  esac
}

is_uint() {
  case $1 in
    ''|*[!0-9]*) return 1;;
  esac
  [ ${#1} -le 18 ]
}

# Helpers set variables instead of printing: a $(...) would fork, and a
# fork costs more than everything else a verb does.

# Sets boot_now.
boot_id() {
  read -r boot_now < /proc/sys/kernel/random/boot_id 2>/dev/null || boot_now=unknown
}

# Sets st_state, st_pgrp, st_sid, st_start from /proc/PID/stat; fails when
# the process is gone. The command name may hold spaces and ')': fields are
# read after the last ')'.
read_stat() {
  line=
  { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  [ $# -ge 20 ] || return 1
  st_state=$1
  st_pgrp=$3
  st_sid=$4
  st_start=${20}
}

# The process is running (not a zombie) and started at $2.
alive_as() {
  read_stat "$1" || return 1
  case $st_state in Z|X) return 1;; esac
  [ "$st_start" = "$2" ]
}

# Some live (not zombie) process is in process group $1. kill -0 also
# counts zombies, which stay forever where init does not reap.
group_alive() {
  g=$1
  kill -0 -- "-$g" 2>/dev/null || return 1
  for f in /proc/[0-9]*/stat; do
    { read -r line < "$f"; } 2>/dev/null || continue
    rest=${line##*) }
    # shellcheck disable=SC2086
    set -- $rest
    [ "$3" = "$g" ] || continue
    case $1 in Z|X) continue;; esac
    return 0
  done
  return 1
}

# Sets cs: centiseconds since boot.
now_cs() {
  read -r cs_up _ < /proc/uptime
  cs_s=${cs_up%.*}
  cs_f=${cs_up#*.}
  cs_f=${cs_f#0}
  cs=$((cs_s * 100 + cs_f))
}

nap() {
  sleep 0.05 2>/dev/null || sleep 1
}

# ---- start ----

used_ports() {
  used=' '
  found=0
  for f in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$f" ] || continue
    found=1
    while read -r _ local _ state _; do
      case $state in
        06|st) continue;;  # TIME_WAIT, and the header line
      esac
      used="$used$((0x${local##*:})) "
    done < "$f"
  done
  if [ $found = 0 ]; then
    command -v ss >/dev/null 2>&1 ||
      fail ports "cannot list the TCP ports in use: no /proc/net/tcp and no ss"
    for p in $(ss -Htan 2>/dev/null | awk '$1 != "TIME-WAIT" { n = split($4, a, ":"); print a[n] }'); do
      used="$used$p "
    done
  fi
}

# A port handed out here stays reserved for RESERVE_S seconds, so two
# starts at once (before either program listens) never share one. Called
# with the lock held: replacing a stale reservation is a read, a remove
# and a create, which two starts must not interleave.
reserve_port() {
  # Seconds since boot: a stamp from before a reboot is larger, and stale.
  now_cs
  now=$((cs / 100))
  f="$resdir/port-$1"
  if (set -C; echo "$now" > "$f") 2>/dev/null; then
    return 0
  fi
  read -r then < "$f" 2>/dev/null || then=0
  is_uint "$then" || then=0
  [ "$then" -gt "$now" ] || [ $((now - then)) -gt $RESERVE_S ] || return 1
  rm -f -- "$f"
  (set -C; echo "$now" > "$f") 2>/dev/null
}

reservation_dir() {
  uid=
  while read -r k v _; do
    if [ "$k" = "Uid:" ]; then uid=$v; break; fi
  done < /proc/self/status
  resdir="${TMPDIR:-/tmp}/deployctl-agent-$uid"
  [ -d "$resdir" ] || mkdir -m 700 -- "$resdir" 2>/dev/null
  if [ ! -d "$resdir" ] || [ -L "$resdir" ] || [ ! -O "$resdir" ]; then
    fail ports "cannot use '$resdir' for port reservations (not a directory of ours): remove it"
  fi
}

# mkdir is atomic: the lock is the directory. One left by a start that
# was killed while holding it (it is held for milliseconds) is taken over
# after 5 s.
lock_ports() {
  now_cs
  deadline=$((cs + 500))
  while ! mkdir -- "$resdir/lock" 2>/dev/null; do
    now_cs
    if [ "$cs" -ge "$deadline" ]; then
      rmdir -- "$resdir/lock" 2>/dev/null
      deadline=$((cs + 500))
    fi
    nap
  done
}

unlock_ports() {
  rmdir -- "$resdir/lock" 2>/dev/null
}

pick_port() {
  used_ports
  reservation_dir
  lock_ports
  pick_locked
  r=$?
  unlock_ports
  return $r
}

pick_locked() {
  p=$lo
  while [ "$p" -le "$hi" ]; do
    case "$used" in
      *" $p "*) ;;
      *)
        case ",$exclude," in
          *",$p,"*) ;;
          *) if reserve_port "$p"; then port=$p; return 0; fi;;
        esac;;
    esac
    p=$((p + 1))
  done
  return 1
}

# {port} in the command becomes the port.
subst_port() {
  s=$1
  out=
  while :; do
    case $s in
      *'{port}'*)
        out="$out${s%%\{port\}*}$port"
        s=${s#*\{port\}};;
      *) break;;
    esac
  done
  cmd="$out$s"
}

# Every line of $env_input must be NAME=value with a shell-safe NAME.
check_env() {
  rest=$env_input
  n=0
  while [ -n "$rest" ]; do
    n=$((n + 1))
    line=${rest%%"$NL"*}
    case $rest in *"$NL"*) rest=${rest#*"$NL"};; *) rest=;; esac
    [ -n "$line" ] || continue
    name=${line%%=*}
    case $line in *=*) ;; *) fail env "environment line $n is not NAME=value";; esac
    case $name in
      ''|[!A-Za-z_]*|*[!A-Za-z0-9_]*) fail env "environment line $n: '$name' is not a valid variable name";;
    esac
  done
}

# Runs in the instance's subshell only: exports the values from stdin.
export_env() {
  rest=$env_input
  while [ -n "$rest" ]; do
    line=${rest%%"$NL"*}
    case $rest in *"$NL"*) rest=${rest#*"$NL"};; *) rest=;; esac
    [ -n "$line" ] || continue
    name=${line%%=*}
    value=$(printf '%bx' "${line#*=}")
    export "$name=${value%x}"
  done
}

do_start() {
  tag= ports= exclude= log= version= target= workdir= cmd=
  while [ $# -gt 0 ]; do
    case $1 in
      --tag|--ports|--exclude|--log|--version|--target|--workdir)
        [ $# -ge 2 ] || fail usage "$1 needs a value"
        check_value "$1" "$2"
        case $1 in
          --tag) tag=$2;; --ports) ports=$2;; --exclude) exclude=$2;;
          --log) log=$2;; --version) version=$2;; --target) target=$2;;
          --workdir) workdir=$2;;
        esac
        shift 2;;
      --) shift; break;;
      *) fail usage "start: unknown option '$1'";;
    esac
  done
  [ $# -eq 1 ] && [ -n "$1" ] || fail usage "start: give the command after --, as one argument"
  command=$1
  [ -n "$tag" ] || fail usage "start: --tag is required"
  [ -n "$log" ] || fail usage "start: --log is required"
  [ -n "$version" ] && [ -n "$target" ] || fail usage "start: --version and --target are required"
  lo=${ports%-*}
  hi=${ports#*-}
  if ! is_uint "$lo" || ! is_uint "$hi" || [ "$lo" -lt 1 ] || [ "$hi" -gt 65535 ] || [ "$lo" -gt "$hi" ]; then
    fail usage "start: --ports '$ports' is not LOW-HIGH within 1-65535"
  fi
  case $exclude in *[!0-9,]*) fail usage "start: --exclude must be ports separated by commas";; esac
  command -v setsid >/dev/null 2>&1 ||
    fail setsid "setsid is missing on this host: install util-linux (or busybox)"
  if [ -n "$workdir" ] && [ ! -d "$workdir" ]; then
    fail workdir "working directory '$workdir' does not exist on this host"
  fi

  env_input= line=
  while IFS= read -r line; do env_input="$env_input$line$NL"; done
  env_input="$env_input$line"
  check_env

  case $log in /*) ;; *) log="$PWD/$log";; esac
  logdir=${log%/*}
  [ -d "${logdir:-/}" ] || mkdir -p -- "${logdir:-/}" 2>/dev/null || fail log "cannot create log directory '$logdir'"
  { : >> "$log"; } 2>/dev/null || fail log "cannot write log '$log'"

  pick_port || fail no-free-port "no free port in $lo-$hi on this host: widen the port range or stop old instances"
  subst_port "$command"
  printf '%s deployctl %s: starting %s %s (%s) on port %s: %s\n' '---' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$target" "$version" "$tag" "$port" "$command" >> "$log"

  (
    if [ -n "$workdir" ]; then cd -- "$workdir" || exit 126; fi
    export_env
    DEPLOY_INSTANCE=$tag DEPLOY_PORT=$port DEPLOY_VERSION=$version DEPLOY_TARGET=$target
    export DEPLOY_INSTANCE DEPLOY_PORT DEPLOY_VERSION DEPLOY_TARGET
    # Not a group leader (no job control here), so setsid execs in place
    # and the pid stays the one we print.
    exec setsid sh -c "$cmd"
  ) < /dev/null >> "$log" 2>&1 &
  pid=$!
  env_input=

  read_stat "$pid" || fail spawn "the instance (pid $pid) vanished before it could be inspected"
  start=$st_start
  # Wait until it leads its own session (setsid has run): stop signals
  # that group.
  # setsid takes about a millisecond: look again at once a hundred times
  # before napping.
  now_cs
  deadline=$((cs + 500))
  spins=0
  while [ "$st_sid" != "$pid" ]; do
    case $st_state in Z|X) break;; esac
    if [ $spins -lt 100 ]; then
      spins=$((spins + 1))
    else
      now_cs
      [ "$cs" -lt "$deadline" ] || fail spawn "the instance (pid $pid) did not start its own session: is setsid installed?"
      nap
    fi
    read_stat "$pid" || break
  done
  boot_id
  printf '%s start port=%s pid=%s starttime=%s boot=%s log=%s\n' \
    "$PROTO" "$port" "$pid" "$start" "$boot_now" "$log"
}

# ---- inspect ----

# The live process carrying DEPLOY_INSTANCE=$1, the session leader first.
find_by_tag() {
  found_pid=
  for f in $(grep -lzxF -- "DEPLOY_INSTANCE=$1" /proc/[0-9]*/environ 2>/dev/null); do
    p=${f#/proc/}
    p=${p%/environ}
    [ "$p" != "$$" ] || continue
    read_stat "$p" || continue
    case $st_state in Z|X) continue;; esac
    if [ "$st_sid" = "$p" ]; then
      found_pid=$p
      found_start=$st_start
      return 0
    fi
    if [ -z "$found_pid" ]; then
      found_pid=$p
      found_start=$st_start
    fi
  done
  [ -n "$found_pid" ]
}

# One instance: check (pass 1) or answer (pass 2).
inspect_one() {
  if [ "$1" = check ]; then
    if [ -n "$q_pid" ] && { ! is_uint "$q_pid" || ! is_uint "$q_start"; }; then
      fail usage "inspect: --pid and --starttime must be numbers"
    fi
    return 0
  fi
  if [ -n "$q_pid" ] && [ "$q_pid" -gt 1 ] && [ "$q_boot" = "$b" ] && alive_as "$q_pid" "$q_start"; then
    printf '%s inspect state=alive pid=%s starttime=%s found=pid boot=%s\n' "$PROTO" "$q_pid" "$q_start" "$b"
  elif find_by_tag "$q_tag"; then
    printf '%s inspect state=alive pid=%s starttime=%s found=tag boot=%s\n' "$PROTO" "$found_pid" "$found_start" "$b"
  else
    printf '%s inspect state=dead pid=0 starttime=0 found=none boot=%s\n' "$PROTO" "$b"
  fi
}

do_inspect() {
  boot_id
  b=$boot_now
  for pass in check answer; do
    q_tag= q_pid= q_start= q_boot= want=
    for a in "$@"; do
      if [ -n "$want" ]; then
        check_value "--$want" "$a"
        case $want in
          tag)
            [ -z "$q_tag" ] || inspect_one $pass
            q_tag=$a q_pid= q_start= q_boot=;;
          pid) q_pid=$a;;
          starttime) q_start=$a;;
          boot) q_boot=$a;;
        esac
        want=
        continue
      fi
      case $a in
        --tag) want=tag;;
        --pid|--starttime|--boot)
          [ -n "$q_tag" ] || fail usage "inspect: each instance begins with --tag"
          want=${a#--};;
        *) fail usage "inspect: unknown option '$a'";;
      esac
    done
    [ -z "$want" ] || fail usage "--$want needs a value"
    [ -n "$q_tag" ] || fail usage "inspect: --tag is required"
    inspect_one $pass
  done
}

# ---- hello ----

do_hello() {
  [ $# -eq 0 ] || fail usage "hello takes no options"
  for c in setsid tail grep; do
    command -v $c >/dev/null 2>&1 ||
      fail missing "$c is missing on this host: install util-linux, coreutils and grep (or busybox)"
  done
  [ -r /proc/self/stat ] || fail proc "/proc is not mounted here: the agent needs Linux /proc"
  # shellcheck disable=SC2086
  set -- ${SSH_CONNECTION:-}
  [ $# -eq 4 ] || fail env "SSH_CONNECTION is not set: the agent runs through ssh"
  boot_id
  printf '%s hello addr=%s boot=%s\n' "$PROTO" "$3" "$boot_now"
}

# ---- stop ----

# Gone: the leader is not running as itself, and (unless the pid now names
# another process, which Linux never allows while our group lives) no
# member of its group is left.
instance_gone() {
  alive_as "$pid" "$start" && return 1
  if read_stat "$pid" && [ "$st_start" != "$start" ]; then
    return 0
  fi
  ! group_alive "$pid"
}

# Signals the group, or the process alone when it leads none, after one
# more look at who holds the pid.
send() {
  if read_stat "$pid" && [ "$st_start" != "$start" ]; then
    return 0
  fi
  kill -s "$1" -- "-$pid" 2>/dev/null || kill -s "$1" "$pid" 2>/dev/null || :
}

# One instance of the stop's list, from the options read so far.
stop_item() {
  if ! is_uint "$pid" || ! is_uint "$start" || [ -z "$boot" ]; then
    fail usage "stop: --pid, --starttime and --boot are required for each instance, --pid and --starttime numbers"
  fi
  # kill -- -1 would signal everything we may signal.
  [ "$pid" -gt 1 ] || fail usage "stop: pid $pid is not an instance"
  # A boot id holds no spaces (it is a field of the list): anything
  # unusual names no boot of this host.
  case $boot in *[!A-Za-z0-9-]*) boot=other;; esac
  items="$items$pid $start $boot$NL"
  pid= start= boot=
}

# Every instance of the list gets SIGTERM at once, then the wait for all
# of them, SIGKILL to those left after MS: stopping a host's instances
# takes one timeout, not one each.
do_stop() {
  pid= start= boot= timeout_ms=10000 items=
  while [ $# -gt 0 ]; do
    case $1 in
      --pid|--starttime|--boot|--timeout-ms)
        [ $# -ge 2 ] || fail usage "$1 needs a value"
        check_value "$1" "$2"
        # A field given twice begins the next instance.
        case $1 in
          --pid) [ -z "$pid" ] || stop_item; pid=$2;;
          --starttime) [ -z "$start" ] || stop_item; start=$2;;
          --boot) [ -z "$boot" ] || stop_item; boot=$2;;
          --timeout-ms) timeout_ms=$2;;
        esac
        shift 2;;
      *) fail usage "stop: unknown option '$1'";;
    esac
  done
  if [ -n "$pid$start$boot" ] || [ -z "$items" ]; then
    stop_item
  fi
  is_uint "$timeout_ms" || fail usage "stop: --timeout-ms must be a number"
  # A pid from another boot names nobody of ours.
  boot_id
  todo=$items list=
  while [ -n "$todo" ]; do
    it=${todo%%"$NL"*}
    todo=${todo#*"$NL"}
    # shellcheck disable=SC2086
    set -- $it
    pid=$1 start=$2
    if [ "$3" != "$boot_now" ] || instance_gone; then
      res=gone
    else
      send TERM
      res=term
    fi
    list="$list$pid $start $res$NL"
  done
  now_cs
  deadline=$((cs + timeout_ms / 10))
  sig=TERM
  while :; do
    todo=$list list= left=
    while [ -n "$todo" ]; do
      it=${todo%%"$NL"*}
      todo=${todo#*"$NL"}
      # shellcheck disable=SC2086
      set -- $it
      pid=$1 start=$2 res=$3
      case $res in
        term|kill)
          if instance_gone; then
            case $res in term) res=stopped;; *) res=killed;; esac
          else
            left=$pid
          fi;;
      esac
      list="$list$pid $start $res$NL"
    done
    [ -n "$left" ] || break
    now_cs
    if [ "$cs" -ge "$deadline" ]; then
      [ $sig = TERM ] || fail stuck "process group $left is still there 5 s after SIGKILL"
      sig=KILL
      todo=$list list=
      while [ -n "$todo" ]; do
        it=${todo%%"$NL"*}
        todo=${todo#*"$NL"}
        # shellcheck disable=SC2086
        set -- $it
        pid=$1 start=$2 res=$3
        if [ "$res" = term ]; then
          send KILL
          res=kill
        fi
        list="$list$pid $start $res$NL"
      done
      deadline=$((cs + 500))
    fi
    nap
  done
  todo=$list
  while [ -n "$todo" ]; do
    it=${todo%%"$NL"*}
    todo=${todo#*"$NL"}
    # shellcheck disable=SC2086
    set -- $it
    printf '%s stop result=%s pid=%s\n' "$PROTO" "$3" "$1"
  done
}

# ---- logs ----

do_logs() {
  log= lines=100 follow=0
  while [ $# -gt 0 ]; do
    case $1 in
      --log|--lines)
        [ $# -ge 2 ] || fail usage "$1 needs a value"
        check_value "$1" "$2"
        case $1 in --log) log=$2;; --lines) lines=$2;; esac
        shift 2;;
      --follow) follow=1; shift;;
      *) fail usage "logs: unknown option '$1'";;
    esac
  done
  [ -n "$log" ] || fail usage "logs: --log is required"
  is_uint "$lines" || fail usage "logs: --lines must be a number"
  [ -f "$log" ] || fail no-log "no log file '$log' on this host"
  if [ $follow = 0 ]; then
    exec tail -n "$lines" -- "$log"
  fi
  tail -n "$lines" -f -- "$log" &
  tailpid=$!
  # stdin stays open while the caller follows; EOF means it went away.
  cat > /dev/null
  kill "$tailpid" 2>/dev/null
  wait "$tailpid" 2>/dev/null
  exit 0
}

do_prune() {
  dir= target= max=0 drops=
  while [ $# -gt 0 ]; do
    case $1 in
      --dir|--target|--max-bytes|--drop)
        [ $# -ge 2 ] || fail usage "$1 needs a value"
        check_value "$1" "$2"
        case $1 in
          --dir) dir=$2;; --target) target=$2;; --max-bytes) max=$2;; --drop) drops=$drops$2$NL;;
        esac
        shift 2;;
      *) fail usage "prune: unknown option '$1'";;
    esac
  done
  [ -n "$dir" ] && [ -n "$target" ] || fail usage "prune: --dir and --target are required"
  is_uint "$max" || fail usage "prune: --max-bytes must be a number"
  removed=0 rotated=0 freed=0
  # Our logs, then one stat for all of them: a fork per file (wc, stat)
  # cost more than everything else the verb does.
  set --
  for f in "$dir/$target"-*.log "$dir/$target"-*.log.1; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    rest=${f##*/}
    rest=${rest#"$target"-}
    rest=${rest%.1}
    rest=${rest%.log}
    idx=${rest##*-} ver=${rest%-*}
    is_uint "$idx" && [ -n "$ver" ] && [ "$ver" != "$rest" ] || continue
    set -- "$@" "$f"
  done
  stats=
  if [ $# -gt 0 ]; then
    now=$(date +%s)
    stats=$(stat -c '%s %Y %n' -- "$@" 2>/dev/null)
  fi
  while [ -n "$stats" ]; do
    line=${stats%%"$NL"*}
    case $stats in *"$NL"*) stats=${stats#*"$NL"};; *) stats=;; esac
    size=${line%% *} line=${line#* }
    mtime=${line%% *} f=${line#* }
    is_uint "$size" && is_uint "$mtime" || continue
    rest=${f##*/}
    rest=${rest#"$target"-}
    case $rest in
      *.log.1) rest=${rest%.log.1} rot=1;;
      *) rest=${rest%.log} rot=0;;
    esac
    ver=${rest%-*}
    case $NL$drops in
      *"$NL$ver$NL"*)
        [ $((now - mtime)) -ge 10 ] || continue
        rm -f -- "$f" && removed=$((removed + 1)) freed=$((freed + size));;
      *)
        if [ $rot = 0 ] && [ "$max" -gt 0 ] && [ "$size" -gt "$max" ]; then
          # Its size again, now: another prune (hosts sharing a file
          # system) may have rotated it since the stat above.
          size=$(wc -c < "$f" 2>/dev/null) || continue
          [ $((size)) -gt "$max" ] || continue
          cp -- "$f" "$f.1.tmp" && mv -f -- "$f.1.tmp" "$f.1" && : > "$f" && rotated=$((rotated + 1))
        fi;;
    esac
  done
  printf '%s prune removed=%s rotated=%s freed=%s\n' "$PROTO" "$removed" "$rotated" "$freed"
}

verb=${1:-}
[ $# -gt 0 ] && shift
case $verb in
  hello) do_hello "$@";;
  start) do_start "$@";;
  inspect) do_inspect "$@";;
  stop) do_stop "$@";;
  logs) do_logs "$@";;
  prune) do_prune "$@";;
  *) fail usage "unknown verb '$verb' (hello, start, inspect, stop, logs, prune)";;
esac
exit 0
