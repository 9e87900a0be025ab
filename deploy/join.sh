#!/usr/bin/env sh
# nova-swarm's one-line join. The hub serves this script at /join/install.sh with the four values
# below filled in; `swarm-hub enroll NODE` prints the line that fetches and runs it:
#
#   curl -fsS [--pinnedpubkey 'sha256//PIN' -k] -H 'Authorization: Bearer KEY' \
#       http(s)://HUB:8080/join/install.sh | sh -s -- JOIN_TOKEN [MODEL]
#
# It fetches the installer for this device (Termux on Android, or Linux) and a wheel of the
# hub's own nova-swarm from the hub, then runs the installer with that wheel: it installs,
# joins with JOIN_TOKEN and starts the node, with autostart. Running it again upgrades in place.
# Third-party packages still come from the device's usual package indexes.
set -eu

HUB_URL='@HUB_URL@'
PIN='@PIN@'
KEY='@KEY@'
WHEEL='@WHEEL@'

say() { printf 'nova-swarm: %s\n' "$*"; }
die() { printf 'nova-swarm: %s\n' "$*" >&2; exit 1; }

fetch() {
  if [ -n "$PIN" ]; then
    # No CA for the hub is on this device yet: curl checks the certificate's public key
    # against the pin instead (-k only skips the CA check; the pin is still enforced).
    curl -fsS --pinnedpubkey "$PIN" -k -H "Authorization: Bearer $KEY" -o "$2" "$HUB_URL/join/$1"
  else
    curl -fsS -H "Authorization: Bearer $KEY" -o "$2" "$HUB_URL/join/$1"
  fi
}

# Everything runs from this function, called on the last line: sh reads a piped script as it
# goes, so the whole script must be read before anything that could read stdin runs.
main() {
  token=${1:-}
  model=${2:-}
  [ -n "$token" ] || die "usage: ... | sh -s -- JOIN_TOKEN [MODEL]   (the line \`swarm-hub enroll NODE\` prints)"
  command -v curl >/dev/null 2>&1 || die "needs curl (Termux: pkg install curl; Debian/Ubuntu: sudo apt-get install curl)"
  case ${PREFIX:-} in
    *com.termux*) platform=termux ;;
    *) platform=linux ;;
  esac
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/nova-swarm-join.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  say "fetching the $platform installer and $WHEEL from $HUB_URL"
  fetch "$platform.sh" "$tmp/install.sh"
  fetch "$platform-uninstall.sh" "$tmp/uninstall.sh"
  fetch "$WHEEL" "$tmp/$WHEEL"
  # The installer keeps the uninstaller on the device, beside what it installed.
  export NOVA_SWARM_SOURCE="$tmp/$WHEEL" NOVA_SWARM_UNINSTALLER="$tmp/uninstall.sh"
  if [ "$platform" = termux ]; then
    sh "$tmp/install.sh" "$token" ${model:+"$model"} </dev/null
  else
    sh "$tmp/install.sh" node "$token" ${model:+"$model"} </dev/null
  fi
}

main "$@"
