#!/usr/bin/env sh
# Remove what deploy/linux/install.sh added, and nothing else (see its installed.txt).
set -eu
DATA=${NOVA_SWARM_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/nova-swarm}
MANIFEST=$DATA/installed.txt
[ -f "$MANIFEST" ] || { printf 'nova-swarm: nothing to uninstall (no %s)\n' "$MANIFEST"; exit 0; }

# A process install.sh started without systemd drains on SIGTERM (a hub on SIGINT).
if [ -f "$DATA/run.pid" ]; then
  pid=$(cat "$DATA/run.pid")
  signal=TERM
  grep -qxF "unit nova-swarm.service" "$MANIFEST" && signal=INT
  kill -"$signal" "$pid" 2>/dev/null || true
  waited=0
  while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 70 ]; do sleep 1; waited=$((waited + 1)); done
fi

have_systemd=0
command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1 && have_systemd=1
dirs=""
while read -r kind path; do
  case $kind in
    unit)
      if [ "$have_systemd" = 1 ]; then systemctl --user disable --now "$path" 2>/dev/null || true; fi ;;
    file) rm -f "$path" ;;
    dir) dirs="$path $dirs" ;;
  esac
done < "$MANIFEST"
if [ "$have_systemd" = 1 ]; then systemctl --user daemon-reload; fi
# Directories last (the manifest lives in one), and only those the installer created.
for d in $dirs; do rm -r "$d"; done
printf 'nova-swarm: removed.\n'
