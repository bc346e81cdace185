#!/bin/sh
# Installs Berth on this host, as root: the binaries, the Docker engine when missing, a
# commented default config, the state directory, a systemd unit (or a background daemon when
# systemd does not run) and a default image; then prints the next two commands. Running it
# again changes only what is missing. It never edits the host's sshd_config or PAM.
#
#   ./install.sh                         install, or check an installation
#   ./install.sh --uninstall             stop and remove the service and binaries
#   ./install.sh --uninstall --purge     ... and users' containers, images, state and config
#
# Environment (for packagers and tests):
#   BERTH_ROOT           prefix for every path written (bin dir, /etc/berth, /var/lib/berth,
#                        unit dir); with a prefix the daemon runs in the background, not as a
#                        systemd unit
#   BERTH_NO_SYSTEMD=1   run the daemon in the background even when systemd runs
#   BERTH_LISTEN         the SSH address written into a new config (default 0.0.0.0:2222)
#   BERTH_DEFAULT_IMAGE  the image made when missing (default berth/debian:bookworm)
#   BERTH_BIN, BERTH_GUEST_BIN   the berth and berth-guest binaries to install
set -eu

usage() {
  cat <<'USAGE'
usage: install.sh [--uninstall [--purge [--yes]]]

  (no option)   install Berth, or check an installation and fix what is missing
  --uninstall   stop and remove the service and the binaries; config, state (users, keys,
                host key), containers and images are kept
  --purge       with --uninstall: also remove this installation's containers, its users'
                committed images, the state directory and /etc/berth (asks first)
  --yes         with --purge: do not ask
  --help        this text

environment: BERTH_ROOT, BERTH_NO_SYSTEMD=1, BERTH_LISTEN, BERTH_DEFAULT_IMAGE, BERTH_BIN,
BERTH_GUEST_BIN (see the top of this script)
USAGE
}

usage_error() {
  printf 'error: %s\n' "$1" >&2
  usage >&2
  exit 2
}

die() {
  printf 'error: %s\n' "$1" >&2
  if [ -n "${2:-}" ]; then printf 'hint: %s\n' "$2" >&2; fi
  exit 1
}

warn() { printf 'warning: %s\n' "$1" >&2; }
say() { printf '%s\n' "$*"; }

mode=install
purge=0
yes=0
for arg in "$@"; do
  case $arg in
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    --yes) yes=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument: $arg" ;;
  esac
done
[ "$purge" = 0 ] || [ "$mode" = uninstall ] || usage_error "--purge goes with --uninstall"
[ "$yes" = 0 ] || [ "$purge" = 1 ] || usage_error "--yes goes with --purge"

[ "$(id -u)" -eq 0 ] || die "install.sh must run as root (it installs binaries, packages and a service)" \
  "run it with sudo: sudo $0 $*"

# The config file is the one source of the state directory; an inherited BERTH_STATE_DIR
# would make the CLI calls below look elsewhere.
unset BERTH_STATE_DIR

here=$(cd "$(dirname "$0")" && pwd)
ROOT=${BERTH_ROOT:-}
ROOT=${ROOT%/}
case $ROOT in
  '' | /*) ;;
  *) die "BERTH_ROOT must be an absolute path: $ROOT" ;;
esac
case $ROOT in
  *\"* | *\\*) die "BERTH_ROOT must not contain a quote or a backslash: $ROOT" ;;
esac
BIN_DIR=$ROOT/usr/local/bin
BERTH=$BIN_DIR/berth
GUEST=$BIN_DIR/berth-guest
CONF_DIR=$ROOT/etc/berth
CONF=$CONF_DIR/berth.toml
UNIT=$ROOT/etc/systemd/system/berth.service
DEFAULT_IMAGE=${BERTH_DEFAULT_IMAGE:-berth/debian:bookworm}

# systemd manages the engine when it runs; the berth unit only without a prefix (a unit
# under BERTH_ROOT would not be seen by the host's systemd).
host_systemd=0
if [ -d /run/systemd/system ] && [ "${BERTH_NO_SYSTEMD:-}" != 1 ] && command -v systemctl >/dev/null 2>&1; then
  host_systemd=1
fi
use_unit=0
if [ "$host_systemd" = 1 ] && [ -z "$ROOT" ]; then use_unit=1; fi

# --- the packaged files, identical to packaging/berth.toml and packaging/berth.service (a test
# checks), carried here so that a release tarball needs nothing else ---

default_config() {
  cat <<'BERTH_TOML'
# Berth daemon configuration (read by `berth daemon`; default path /etc/berth/berth.toml).
# Every setting is shown commented out with its default value: uncomment a line to change it.
# `berth daemon --check --config FILE` validates the file and prints the effective settings;
# an unknown key is an error naming it. Restart the daemon after a change
# (`systemctl restart berth`).

# Address and port the SSH gateway listens on (users run `ssh -p PORT user@host`).
# listen = "0.0.0.0:2222"

# Database, host key (0600), admin socket and the guest helper's files live here.
# state_dir = "/var/lib/berth"

# The Docker engine's socket.
# docker_socket = "/var/run/docker.sock"

# Seconds a container keeps running after its last session closes; a login cancels the stop.
# idle_stop_seconds = 10

# Seconds `docker stop` waits after SIGTERM before it kills a container.
# stop_timeout_seconds = 10

# Container names are this prefix followed by the user name.
# container_prefix = "berth-"

# `commit` saves a user's container as the image REPOSITORY:USER.
# commit_repository = "berth/users"

# Docker network the users' containers join (created with inter-container traffic off).
# network = "berth"

# The static berth-guest helper; by default the berth-guest next to the berth binary.
# guest_binary = "/usr/local/bin/berth-guest"

# Allow ssh -L and -R (server-wide; `berth user set NAME --tcp-forwarding` sets one user apart).
# allow_tcp_forwarding = true

# Allow ssh -A agent forwarding (server-wide; `berth user set` sets one user apart).
# allow_agent_forwarding = true

# Allow ssh -X, which needs xauth in the image (server-wide; `berth user set` sets one user apart).
# allow_x11_forwarding = true

# Client environment variables passed into sessions (NAME or PREFIX*), like sshd's AcceptEnv.
# accept_env = ["LANG", "LC_*"]

# CA public keys (one per line) whose user certificates log in as the Berth user their
# principals name, if that user exists (OpenSSH's TrustedUserCAKeys); off when unset.
# trusted_user_ca_keys = "/etc/berth/user_ca.pub"

# Keys and certificates refused whatever else says (OpenSSH's RevokedKeys): public keys, one
# per line, or a KRL made by `ssh-keygen -k`. Read again whenever it changes; off when unset.
# revoked_keys = "/etc/berth/revoked_keys"

# Key exchange algorithms offered, most preferred first (OpenSSH's KexAlgorithms). The default
# has no finite-field Diffie-Hellman: add e.g. "diffie-hellman-group14-sha256" only for a client
# that has nothing else. `berth daemon --check` refuses a name Berth does not implement and lists those it does.
# kex_algorithms = ["mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org"]

# Ciphers offered (OpenSSH's Ciphers): AEAD, then CTR.
# ciphers = ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr"]

# MACs offered with the CTR ciphers (OpenSSH's MACs): encrypt-then-MAC SHA-2 only.
# macs = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"]

# Seconds between keepalive probes to a client that is silent.
# keepalive_interval_seconds = 15

# A client that misses this many keepalive probes in a row is gone; its programs are killed.
# keepalive_max = 4

# Authenticated SSH connections open at once, all users together (unauthenticated ones are
# limited apart, below, so a flood of them never keeps out a user who has a key).
# max_connections = 1000

# Unauthenticated connections, as START:RATE:FULL: past START, new ones are dropped with a
# probability rising from RATE % to 100 % at FULL (OpenSSH's MaxStartups).
# max_startups = "10:30:100"

# Unauthenticated connections one source (an IPv4 address, or an IPv6 /64) may hold.
# per_source_max_startups = 10

# Seconds a client has to authenticate before its connection is closed.
# login_grace_seconds = 30

# Sessions one SSH connection may have open at once (OpenSSH's MaxSessions).
# max_sessions = 10

# Failures per minute from one source (connections that end without logging in, or that ask for
# more than per_source_max_startups) before its connections are closed at once; 0 = no limit.
# max_auth_failures_per_minute = 30

# Addresses or ranges never penalised for failures, e.g. ["10.0.0.0/8", "2001:db8::/32"]
# (OpenSSH's PerSourcePenaltyExemptList); their connections still count as startups.
# penalty_exempt = []

# The audit log (STATE/audit.log, one JSON line per event) is rotated past this many MiB; one older file is kept.
# audit_max_mb = 64

# Serve Prometheus metrics at http://ADDRESS/metrics; off when unset (example below).
# metrics_listen = "127.0.0.1:9100"

# Limits for each user's container. Keep the [limits] line; uncomment keys below it.
[limits]

# Memory per container in MiB, swap included; 0 = no limit.
# memory_mb = 2048

# CPUs per container (e.g. 1.5); 0 = no limit.
# cpus = 1.0

# Processes per container (at least 16).
# pids = 1024
BERTH_TOML
}

default_unit() {
  cat <<'BERTH_SERVICE'
[Unit]
Description=Berth: personal containers reached with plain ssh
After=network-online.target docker.service
Wants=network-online.target docker.service

[Service]
ExecStart=/usr/local/bin/berth daemon --config /etc/berth/berth.toml
Restart=on-failure
RestartSec=2
TimeoutStopSec=60
# Every connection and session holds descriptors; the daemon raises its soft limit to this.
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
BERTH_SERVICE
}

# --- helpers ---

# The effective settings: `berth daemon --check` when the binary and config are there, else
# the config's top-level lines (an uninstall after the binary is gone), else nothing.
load_settings() {
  settings=
  if [ -x "$BERTH" ] && [ -f "$CONF" ]; then
    if ! settings=$("$BERTH" daemon --check --config "$CONF" 2>&1); then
      if [ "$mode" = install ]; then
        die "$CONF is invalid: $settings" "berth daemon --check --config $CONF names the bad key"
      fi
      # Uninstalling must work even with a broken config: read its lines as they are.
      warn "$CONF is invalid ($settings); reading its settings as plain lines"
      settings=$(awk '/^[[:space:]]*\[/ { exit } { print }' "$CONF")
    fi
  elif [ -f "$CONF" ]; then
    settings=$(awk '/^[[:space:]]*\[/ { exit } { print }' "$CONF")
  fi
}

# setting KEY DEFAULT: a top-level string setting.
setting() {
  v=$(printf '%s\n' "$settings" |
    sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"\([^\"]*\)\".*/\1/p" | head -n 1)
  printf '%s' "${v:-$2}"
}

# engine_answers SOCKET: a Docker engine answers there (asked with the CLI, or curl without one).
engine_answers() {
  if command -v docker >/dev/null 2>&1; then
    docker -H "unix://$1" version --format '{{.Server.Version}}' >/dev/null 2>&1
  elif command -v curl >/dev/null 2>&1; then
    curl -sf --max-time 5 --unix-socket "$1" http://localhost/_ping >/dev/null 2>&1
  else
    return 1
  fi
}

engine_version() {
  docker -H "unix://$1" version --format '{{.Server.Version}}' 2>/dev/null || echo "?"
}

# Alive and not a zombie.
pid_alive() {
  case ${1:-} in '' | *[!0-9]*) return 1 ;; esac
  [ -r "/proc/$1/stat" ] || return 1
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
  [ -n "$st" ] && [ "$st" != Z ]
}

# The process is a berth daemon (never signal a pid that was reused by something else).
pid_is_berth() {
  pid_alive "$1" || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'berth daemon'
}

daemon_answers() {
  [ -x "$BERTH" ] && "$BERTH" --state-dir "$STATE" user list >/dev/null 2>&1
}

# Stops the daemon recorded in STATE/berth.pid: 0 stopped, 1 no pid file, 2 stale pid file.
stop_background() {
  pidfile=$STATE/berth.pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  if ! pid_is_berth "$pid"; then
    rm -f "$pidfile"
    return 2
  fi
  kill -TERM "$pid" 2>/dev/null || true
  i=0
  while pid_is_berth "$pid"; do
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then
      warn "berth daemon (pid $pid) did not stop in 20 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$pidfile"
  return 0
}

# Starts `berth daemon` in the background, in its own session, and waits until it answers.
start_background() {
  pidfile=$STATE/berth.pid
  log=$STATE/berth.log
  rm -f "$pidfile"
  # The pid is written by the process that becomes the daemon (setsid may fork).
  # shellcheck disable=SC2016 # expanded by the inner shell
  setsid sh -c 'echo $$ >"$1"; exec nohup "$2" daemon --config "$3"' sh "$pidfile" "$BERTH" "$CONF" \
    </dev/null >>"$log" 2>&1 &
  i=0
  until daemon_answers; do
    i=$((i + 1))
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ "$i" -gt 200 ] || { [ "$i" -gt 10 ] && ! pid_alive "$pid"; }; then
      printf 'error: the berth daemon did not start; the end of %s:\n' "$log" >&2
      tail -n 20 "$log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  pid=$(cat "$pidfile")
}

# Copies SRC to DST (0755) unless DST has the same content and mode; 0 when it copied.
install_bin() {
  if [ -f "$2" ] && cmp -s "$1" "$2" && [ "$(stat -c %a "$2")" = 755 ]; then return 1; fi
  cp "$1" "$2.new.$$"
  chmod 0755 "$2.new.$$"
  mv -f "$2.new.$$" "$2"
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 ||
    die "$1 is needed and apt-get is not available" "install $1 with this system's package manager, then run $0 again"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >&2 || die "apt-get install $1 failed"
}

# --- install ---

find_binaries() {
  src_berth=${BERTH_BIN:-}
  src_guest=${BERTH_GUEST_BIN:-}
  if [ -z "$src_berth" ] && [ -f "$here/berth" ]; then src_berth=$here/berth; fi
  if [ -z "$src_guest" ] && [ -f "$here/berth-guest" ]; then src_guest=$here/berth-guest; fi
  if [ -z "$src_berth" ] || [ -z "$src_guest" ]; then
    if [ ! -f "$here/Cargo.toml" ] || [ ! -d "$here/crates/berth" ]; then
      die "no berth binaries to install" \
        "run this script from a release tarball (berth and berth-guest next to it) or from the source tree with Rust installed, or set BERTH_BIN and BERTH_GUEST_BIN"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
      if [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
        PATH=${HOME:-/root}/.cargo/bin:$PATH
        export PATH
      else
        die "cargo not found: building Berth from source needs Rust" \
          "install Rust (https://rustup.rs), or use a release tarball"
      fi
    fi
    if [ -z "$src_berth" ]; then
      say "binaries: building berth (cargo build --release; a few minutes the first time)"
      (cd "$here" && cargo build --release -p berth >&2) || die "cargo build --release -p berth failed"
      target=${CARGO_TARGET_DIR:-target}
      case $target in /*) ;; *) target=$here/$target ;; esac
      src_berth=$target/release/berth
    fi
    if [ -z "$src_guest" ]; then
      say "binaries: building berth-guest (scripts/build-guest --release)"
      src_guest=$("$here/scripts/build-guest" --release) || die "scripts/build-guest --release failed"
    fi
  fi
  for f in "$src_berth" "$src_guest"; do
    if [ ! -f "$f" ] || [ ! -x "$f" ]; then die "$f is not an executable file"; fi
  done
}

do_install() {
  changed=0

  # 1. Binaries.
  find_binaries
  mkdir -p "$BIN_DIR"
  bin_changed=0
  if install_bin "$src_berth" "$BERTH"; then bin_changed=1; fi
  if install_bin "$src_guest" "$GUEST"; then bin_changed=1; fi
  if [ "$bin_changed" = 1 ]; then
    say "binaries: installed $BERTH and $GUEST"
    changed=1
  else
    say "binaries: unchanged ($BERTH, $GUEST)"
  fi

  # 2. Docker engine: decided by what Berth needs, an engine answering on the configured
  # socket or a dockerd to start; a docker CLI alone (some machines ship one) is no engine.
  load_settings
  sock=$(setting docker_socket /var/run/docker.sock)
  # Every docker call below (the default image) goes to the same engine.
  export DOCKER_HOST="unix://$sock"
  if engine_answers "$sock"; then
    say "docker: unchanged (engine $(engine_version "$sock") answers on $sock)"
  else
    if ! command -v dockerd >/dev/null 2>&1; then
      if cli=$(command -v docker 2>/dev/null); then
        say "docker: no Docker engine (a docker CLI at $cli, but no dockerd); installing docker.io from the distribution's packages"
      else
        say "docker: no Docker engine; installing docker.io from the distribution's packages"
      fi
      apt_install docker.io
    fi
    if engine_answers "$sock"; then
      :
    elif [ "$host_systemd" = 1 ] && [ "$sock" = /var/run/docker.sock ]; then
      say "docker: starting the engine (systemctl enable --now docker)"
      systemctl enable --now docker >&2 || true
    else
      say "docker: starting the engine in the background (dockerd -H unix://$sock, log /var/log/berth-dockerd.log)"
      setsid nohup dockerd -H "unix://$sock" </dev/null >>/var/log/berth-dockerd.log 2>&1 &
    fi
    i=0
    until engine_answers "$sock"; do
      i=$((i + 1))
      [ "$i" -le 60 ] || die "the Docker engine did not start in 60 s" \
        "see /var/log/berth-dockerd.log or journalctl -u docker"
      sleep 1
    done
    say "docker: engine $(engine_version "$sock") answers on $sock"
    changed=1
  fi

  # 3. Config: written once, never overwritten.
  config_new=0
  if [ -f "$CONF" ]; then
    say "config: kept $CONF"
  else
    set_state=
    set_listen=
    if [ -n "$ROOT" ]; then set_state="state_dir = \"$ROOT/var/lib/berth\""; fi
    if [ -n "${BERTH_LISTEN:-}" ]; then
      case $BERTH_LISTEN in *\"* | *\\*) die "BERTH_LISTEN must be ADDR:PORT: $BERTH_LISTEN" ;; esac
      set_listen="listen = \"$BERTH_LISTEN\""
    fi
    mkdir -p "$CONF_DIR"
    tmp=$CONF.new.$$
    default_config | SET_STATE=$set_state SET_LISTEN=$set_listen awk '
      $0 == "# state_dir = \"/var/lib/berth\"" && ENVIRON["SET_STATE"] != "" { print ENVIRON["SET_STATE"]; next }
      $0 == "# listen = \"0.0.0.0:2222\"" && ENVIRON["SET_LISTEN"] != "" { print ENVIRON["SET_LISTEN"]; next }
      { print }' >"$tmp"
    chmod 0644 "$tmp"
    if ! out=$("$BERTH" daemon --check --config "$tmp" 2>&1); then
      rm -f "$tmp"
      die "the new config is invalid: $out"
    fi
    mv -f "$tmp" "$CONF"
    say "config: wrote $CONF (every setting commented out with its default${set_state:+; $set_state}${set_listen:+; $set_listen})"
    changed=1
    config_new=1
  fi
  load_settings
  STATE=$(setting state_dir /var/lib/berth)
  LISTEN=$(setting listen 0.0.0.0:2222)
  if [ -n "${BERTH_LISTEN:-}" ] && [ "$BERTH_LISTEN" != "$LISTEN" ]; then
    warn "BERTH_LISTEN=$BERTH_LISTEN ignored: the kept config listens on $LISTEN"
  fi

  # 4. State directory.
  if [ -d "$STATE" ]; then
    say "state: unchanged ($STATE)"
  else
    mkdir -p "$(dirname "$STATE")"
    mkdir -m 0700 "$STATE"
    say "state: created $STATE (0700)"
    changed=1
  fi

  # 5. Service.
  restart=0
  if [ "$bin_changed" = 1 ] || [ "$config_new" = 1 ]; then restart=1; fi
  if [ "$use_unit" = 1 ]; then
    unit_changed=0
    if ! { [ -f "$UNIT" ] && default_unit | cmp -s - "$UNIT"; }; then
      mkdir -p "$(dirname "$UNIT")"
      default_unit >"$UNIT.new.$$"
      chmod 0644 "$UNIT.new.$$"
      mv -f "$UNIT.new.$$" "$UNIT"
      systemctl daemon-reload
      unit_changed=1
    fi
    if [ "$unit_changed" = 0 ] && [ "$restart" = 0 ] &&
      systemctl is-enabled --quiet berth && systemctl is-active --quiet berth; then
      say "service: unchanged (berth.service enabled and active)"
    else
      systemctl enable --quiet berth
      if systemctl is-active --quiet berth; then
        systemctl restart berth
        say "service: installed $UNIT, enabled and restarted berth.service"
      else
        systemctl start berth
        say "service: installed $UNIT, enabled and started berth.service"
      fi
      changed=1
    fi
    i=0
    until daemon_answers; do
      i=$((i + 1))
      if [ "$i" -gt 200 ]; then
        printf 'error: berth.service does not answer; its last log lines:\n' >&2
        journalctl -u berth -n 20 --no-pager >&2 || true
        exit 1
      fi
      sleep 0.1
    done
  else
    pidfile=$STATE/berth.pid
    if daemon_answers; then
      if [ "$restart" = 1 ]; then
        if stop_background; then
          start_background
          say "daemon: restarted in the background for the new binary or config (pid $pid, log $STATE/berth.log)"
          changed=1
        else
          warn "a berth daemon answers on $STATE but was not started by this script: restart it to use the new binary or config"
          say "daemon: unchanged (running, not started by this script)"
        fi
      else
        say "daemon: unchanged (running$( [ -f "$pidfile" ] && printf ', pid %s' "$(cat "$pidfile")"))"
      fi
    else
      start_background
      say "daemon: started in the background without systemd (pid $pid, log $STATE/berth.log)"
      changed=1
    fi
    if [ -f "$pidfile" ]; then
      say "  to stop it: kill \$(cat $pidfile)   or: $0 --uninstall"
    fi
  fi

  # 6. Default image.
  if docker image inspect "$DEFAULT_IMAGE" >/dev/null 2>&1; then
    say "image: unchanged ($DEFAULT_IMAGE is present)"
  else
    if ! command -v debootstrap >/dev/null 2>&1; then
      say "image: debootstrap not found; installing debootstrap from the distribution's packages"
      apt_install debootstrap
    fi
    say "image: making $DEFAULT_IMAGE with debootstrap (takes about a minute)"
    "$BERTH" --state-dir "$STATE" image bootstrap "$DEFAULT_IMAGE" >&2 ||
      die "cannot make the default image $DEFAULT_IMAGE" \
        "make one with docker import (see README) and give it to berth user add --image; then run $0 again"
    say "image: made $DEFAULT_IMAGE"
    changed=1
  fi

  # 7. What to do next.
  port=${LISTEN##*:}
  host=${LISTEN%:*}
  host=${host#\[}
  host=${host%\]}
  case $host in
    0.0.0.0 | ::) host=$(hostname -f 2>/dev/null || hostname) ;;
  esac
  cli=berth
  if [ -n "$ROOT" ]; then cli=$BERTH; fi
  if [ "$STATE" != /var/lib/berth ]; then cli="$cli --state-dir $STATE"; fi
  say ""
  say "next, add a user with her public key; she logs in with plain ssh:"
  say "  $cli user add alice --image $DEFAULT_IMAGE --key ~alice/.ssh/id_ed25519.pub"
  say "  ssh -p $port alice@$host"
  if [ "$changed" = 0 ]; then
    say "Berth is already installed; nothing changed."
  else
    say "Berth is installed."
  fi
}

# --- uninstall ---

# Removes what Berth keeps in the state directory, entry by entry, then the directory if
# that left it empty: a config typo (state_dir = "/home") never costs anybody's files.
remove_state() {
  for f in berth.db berth.db-wal berth.db-shm berth.db-journal instance audit.log audit.log.1 \
           host_ed25519_key host_ed25519_key.pub admin.sock daemon.lock berth.pid berth.log \
           guest run; do
    if [ -e "$1/$f" ] || [ -L "$1/$f" ]; then rm -rf "${1:?}/$f"; fi
  done
  if rmdir "$1" 2>/dev/null; then
    say "state: removed $1"
  else
    warn "$1 holds files Berth did not make; removed Berth's own and left the rest"
  fi
}

do_uninstall() {
  load_settings
  STATE=$(setting state_dir "$ROOT/var/lib/berth")
  REPO=$(setting commit_repository berth/users)

  if [ "$purge" = 1 ]; then
    if [ "$yes" = 0 ]; then
      if [ ! -t 0 ]; then
        die "--purge deletes this installation's containers, users' images, $STATE and $CONF_DIR; nothing was changed" \
          "confirm with --yes: $0 --uninstall --purge --yes"
      fi
      printf 'This deletes the containers of this Berth installation, its users'\'' committed images (%s:*), %s and %s. Continue? [y/N] ' \
        "$REPO" "$STATE" "$CONF_DIR" >&2
      answer=
      read -r answer || true
      case $answer in
        y | Y | yes | YES) ;;
        *) die "purge not confirmed; nothing was changed" ;;
      esac
    fi
    sock=$(setting docker_socket /var/run/docker.sock)
    export DOCKER_HOST="unix://$sock"
    engine_answers "$sock" ||
      die "the Docker engine does not answer on $sock; --purge needs it to remove containers and images; nothing was changed" \
        "start it (systemctl start docker, or dockerd), then run $0 --uninstall --purge again"
  fi

  # The service or the background daemon.
  stopped=0
  if [ -f "$UNIT" ]; then
    # Stop the unit even when BERTH_NO_SYSTEMD=1: it was installed when systemd ran.
    unit_systemd=0
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      unit_systemd=1
    fi
    if [ "$unit_systemd" = 1 ]; then
      systemctl disable --now --quiet berth || true
    fi
    rm -f "$UNIT"
    if [ "$unit_systemd" = 1 ]; then systemctl daemon-reload; fi
    say "service: stopped and removed $UNIT"
    stopped=1
  fi
  if [ -f "$STATE/berth.pid" ]; then
    pid=$(cat "$STATE/berth.pid")
    if stop_background; then
      say "daemon: stopped (pid $pid)"
    else
      say "daemon: was not running (removed the stale $STATE/berth.pid)"
    fi
    stopped=1
  fi
  if [ "$stopped" = 0 ]; then
    say "service: none installed"
  fi
  if daemon_answers; then
    if [ "$purge" = 1 ]; then
      die "a berth daemon still answers on $STATE/admin.sock (not started by this script); nothing was purged" \
        "stop it first, then run $0 --uninstall --purge again"
    fi
    warn "a berth daemon still answers on $STATE/admin.sock; it was not started by this script: stop it yourself"
  fi

  # The binaries.
  if [ -e "$BERTH" ] || [ -e "$GUEST" ]; then
    rm -f "$BERTH" "$GUEST"
    say "binaries: removed $BERTH and $GUEST"
  else
    say "binaries: not installed"
  fi

  if [ "$purge" = 0 ]; then
    say "kept: config $CONF_DIR, state $STATE (users, keys, host key), users' containers and images"
    say "to remove them too: $0 --uninstall --purge"
    return
  fi

  instance=$(cat "$STATE/instance" 2>/dev/null || true)
  if [ -n "$instance" ]; then
    ids=$(docker ps -aq --filter "label=berth.instance=$instance")
    n=0
    for id in $ids; do
      if docker rm -f "$id" >/dev/null; then n=$((n + 1)); else warn "cannot remove container $id"; fi
    done
    say "containers: removed $n of this installation (berth.instance=$instance)"
  else
    say "containers: none recorded ($STATE/instance is missing)"
  fi
  n=0
  for image in $(docker image ls --format '{{.Repository}}:{{.Tag}}' "$REPO"); do
    if docker rmi "$image" >/dev/null; then n=$((n + 1)); else warn "cannot remove image $image"; fi
  done
  say "images: removed $n of $REPO"
  if [ -d "$STATE" ] && [ "$STATE" != / ]; then
    remove_state "$STATE"
  fi
  if [ -d "$CONF_DIR" ]; then
    rm -rf "$CONF_DIR"
    say "config: removed $CONF_DIR"
  fi
  say "Berth is removed; other containers and images (the default image too) are left alone."
}

if [ "$mode" = install ]; then
  do_install
else
  do_uninstall
fi
