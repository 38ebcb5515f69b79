#!/usr/bin/env bash
# Install the Debian packages given as arguments when any is missing.
# Quick when all are present: one dpkg-query, no apt.
set -euo pipefail
missing=()
for p in "$@"; do
    s=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $s == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "deps: installing ${missing[*]}" >&2
SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
# Debian's postinst scripts may start system daemons on their default ports;
# the project never uses them (it starts its own on other ports).
