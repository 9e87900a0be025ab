#!/usr/bin/env sh
# Remove what deploy/termux/install.sh added, and nothing else (see ~/.nova-swarm/installed.txt).
# Termux packages it installed are listed, not removed: other apps may use them by now.
set -eu
DIR=${NOVA_SWARM_DIR:-$HOME/.nova-swarm}
MANIFEST=$DIR/installed.txt
[ -f "$MANIFEST" ] || { printf 'nova-swarm: nothing to uninstall (no %s)\n' "$MANIFEST"; exit 0; }

# The node's run loop drains the node on SIGTERM, then ends.
if [ -f "$DIR/run-node.pid" ]; then
  pid=$(cat "$DIR/run-node.pid")
  kill -TERM "$pid" 2>/dev/null || true
  waited=0
  while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 70 ]; do sleep 1; waited=$((waited + 1)); done
fi
packages=""
while read -r kind path; do
  case $kind in
    file) rm -f "$path" ;;
    package) packages="$packages $path" ;;
  esac
done < "$MANIFEST"
# The install directory last: it holds the manifest. Only a directory the installer made.
grep -qxF "dir $DIR" "$MANIFEST" && rm -r "$DIR"
if [ -n "$packages" ]; then
  printf 'nova-swarm: removed. Termux packages it had installed:%s (pkg uninstall them if unused)\n' "$packages"
else
  printf 'nova-swarm: removed.\n'
fi
