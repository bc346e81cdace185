#!/bin/sh
# Installs Berth on this host, as root: the binaries, their manual pages and shell
# completions, the Docker engine when missing, a commented default config, the state directory, a systemd unit (or a background daemon when
# systemd does not run) and a default image; then prints the next two commands. Running it
# again changes only what is missing. It never edits the host's sshd_config or PAM.
# What Berth itself defines comes from the berth binary: the default config (`berth config
# default`), the systemd unit (`berth config unit`), the settings (`berth config get`) and
# what a purge removes (`berth purge`); this script keeps packages, the service and paths.
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
# Manual pages and completions, where man and the shells look for local ones.
SHARE=$ROOT/usr/local/share
MAN1=$SHARE/man/man1/berth.1
MAN5=$SHARE/man/man5/berth.toml.5
COMP_BASH=$SHARE/bash-completion/completions/berth
COMP_ZSH=$SHARE/zsh/site-functions/_berth
COMP_FISH=$SHARE/fish/vendor_completions.d/berth.fish
DEFAULT_IMAGE=${BERTH_DEFAULT_IMAGE:-berth/debian:bookworm}

# systemd manages the engine when it runs; the berth unit only without a prefix (a unit
# under BERTH_ROOT would not be seen by the host's systemd).
host_systemd=0
if [ -d /run/systemd/system ] && [ "${BERTH_NO_SYSTEMD:-}" != 1 ] && command -v systemctl >/dev/null 2>&1; then
  host_systemd=1
fi
use_unit=0
if [ "$host_systemd" = 1 ] && [ -z "$ROOT" ]; then use_unit=1; fi

# --- helpers ---

# The settings are the binary's to read (the installed one, or for an uninstall after the
# binaries are gone, the one this script would install: find_cli). An install refuses an
# invalid config; an uninstall reads what it can of one (lenient=1), so that a broken config
# never keeps Berth installed.
lenient=
cli_bin=$BERTH

# config_get KEY: one effective setting. With no config file, the defaults under the prefix
# (never the host's own /etc/berth/berth.toml).
config_get() {
  if [ ! -f "$CONF" ]; then
    "$cli_bin" --state-dir "$ROOT/var/lib/berth" config get "$1" --config /dev/null
  elif [ -n "$lenient" ]; then
    "$cli_bin" config get "$1" --config "$CONF" --lenient
  else
    "$cli_bin" config get "$1" --config "$CONF"
  fi
}

# The settings an install needs, from the config as it is now (none yet: the defaults).
load_settings() {
  if [ -f "$CONF" ] && ! out=$("$BERTH" daemon --check --config "$CONF" 2>&1); then
    die "$CONF is invalid: $out" "berth daemon --check --config $CONF names the bad key"
  fi
  SOCK=$(config_get docker_socket) || die "cannot read docker_socket from $CONF"
  STATE=$(config_get state_dir) || die "cannot read state_dir from $CONF"
  LISTEN=$(config_get listen) || die "cannot read listen from $CONF"
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
  [ -x "$cli_bin" ] && "$cli_bin" --state-dir "$STATE" user list >/dev/null 2>&1
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

# write_text DST CMD...: DST (0644) becomes what CMD prints, unless it already is; 0 when
# it wrote.
write_text() {
  dst=$1
  shift
  mkdir -p "$(dirname "$dst")"
  "$@" >"$dst.new.$$" || { rm -f "$dst.new.$$"; die "cannot run $*"; }
  if [ -f "$dst" ] && cmp -s "$dst.new.$$" "$dst"; then
    rm -f "$dst.new.$$"
    return 1
  fi
  chmod 0644 "$dst.new.$$"
  mv -f "$dst.new.$$" "$dst"
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

  # Manual pages and completions, made by the binary just installed (so they match it).
  docs_changed=0
  write_text "$MAN1" "$BERTH" man berth && docs_changed=1
  write_text "$MAN5" "$BERTH" man berth.toml && docs_changed=1
  write_text "$COMP_BASH" "$BERTH" completions bash && docs_changed=1
  write_text "$COMP_ZSH" "$BERTH" completions zsh && docs_changed=1
  write_text "$COMP_FISH" "$BERTH" completions fish && docs_changed=1
  if [ "$docs_changed" = 1 ]; then
    say "manuals: installed berth(1) and berth.toml(5) in $SHARE/man; completions for bash, zsh and fish"
    changed=1
  else
    say "manuals: unchanged (berth(1), berth.toml(5), completions for bash, zsh and fish)"
  fi

  # 2. Docker engine: decided by what Berth needs, an engine answering on the configured
  # socket or a dockerd to start; a docker CLI alone (some machines ship one) is no engine.
  load_settings
  sock=$SOCK
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
    # The binary writes it: every setting commented out with its default, but the prefix's
    # state directory and BERTH_LISTEN, which are set.
    set_state=
    set_listen=
    set --
    if [ -n "$ROOT" ]; then
      set_state="state_dir = \"$ROOT/var/lib/berth\""
      set -- --state-dir "$ROOT/var/lib/berth"
    fi
    set -- "$@" config default
    if [ -n "${BERTH_LISTEN:-}" ]; then
      set_listen="listen = \"$BERTH_LISTEN\""
      set -- "$@" --listen "$BERTH_LISTEN"
    fi
    mkdir -p "$CONF_DIR"
    tmp=$CONF.new.$$
    if ! out=$("$BERTH" "$@" 2>&1 >"$tmp"); then
      rm -f "$tmp"
      case $out in *--listen*) die "BERTH_LISTEN must be ADDR:PORT: $BERTH_LISTEN" ;; esac
      die "cannot make the default config: $out"
    fi
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
    mkdir -p "$(dirname "$UNIT")"
    if ! "$BERTH" config unit --binary "$BERTH" --config "$CONF" >"$UNIT.new.$$"; then
      rm -f "$UNIT.new.$$"
      die "cannot make the systemd unit"
    fi
    if [ -f "$UNIT" ] && cmp -s "$UNIT.new.$$" "$UNIT"; then
      rm -f "$UNIT.new.$$"
    else
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

# The berth binary for an uninstall, in cli_bin: the installed one, else the one this script
# would install without building it (BERTH_BIN, the tarball's, this tree's release build).
find_cli() {
  target=${CARGO_TARGET_DIR:-target}
  case $target in /*) ;; *) target=$here/$target ;; esac
  for f in "$BERTH" "${BERTH_BIN:-}" "$here/berth" "$target/release/berth"; do
    if [ -n "$f" ] && [ -f "$f" ] && [ -x "$f" ]; then
      cli_bin=$f
      return 0
    fi
  done
  return 1
}

# The settings an uninstall needs: STATE, SOCK, REPO; lenient=1 when the config is invalid.
uninstall_settings() {
  STATE=$ROOT/var/lib/berth
  SOCK=/var/run/docker.sock
  REPO=berth/users
  if ! find_cli; then
    # The purge is the binary's work; a plain uninstall only needs the state directory.
    [ "$purge" = 0 ] ||
      die "--purge needs the berth binary, and there is none at $BERTH; nothing was changed" \
        "set BERTH_BIN to one, run this script from a release tarball, or build one (cargo build --release -p berth)"
    if [ -f "$CONF" ]; then
      warn "no berth binary to read $CONF with; assuming the state directory $STATE"
    fi
    cli_bin=
    return
  fi
  if [ -f "$CONF" ] && ! out=$(config_get state_dir 2>&1 >/dev/null); then
    warn "$CONF is invalid ($out); reading what it can of it"
    lenient=1
  fi
  if v=$(config_get state_dir); then STATE=$v; fi
  if v=$(config_get docker_socket); then SOCK=$v; fi
  if v=$(config_get commit_repository); then REPO=$v; fi
}

do_uninstall() {
  uninstall_settings

  if [ "$purge" = 1 ]; then
    # The config says what belongs to this installation: a broken one is not guessed at.
    [ -z "$lenient" ] ||
      die "--purge needs a valid $CONF (it names this installation's state, engine and images); nothing was changed" \
        "fix it (berth daemon --check --config $CONF names the bad key), then run $0 --uninstall --purge again"
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
    engine_answers "$SOCK" ||
      die "the Docker engine does not answer on $SOCK; --purge needs it to remove containers and images; nothing was changed" \
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

  # This installation's containers, images and state: the binary knows which they are (by
  # the instance label, the commit repository and the entries it makes), before it goes.
  if [ "$purge" = 1 ]; then
    cfg=$CONF
    [ -f "$cfg" ] || cfg=/dev/null
    "$cli_bin" --state-dir "$STATE" purge --config "$cfg" --yes ||
      die "berth purge failed; the binaries and $CONF_DIR are kept" "run $0 --uninstall --purge again"
  fi

  # Manual pages and completions.
  docs_found=0
  for f in "$MAN1" "$MAN5" "$COMP_BASH" "$COMP_ZSH" "$COMP_FISH"; do
    if [ -e "$f" ]; then
      rm -f "$f"
      docs_found=1
    fi
  done
  if [ "$docs_found" = 1 ]; then
    say "manuals: removed berth(1), berth.toml(5) and the completions"
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
