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
# Debian's postinst scripts would start system daemons (nginx, nats-server,
# mosquitto, prometheus) on their default ports; the project starts its own
# on other ports, so forbid service starts during the install.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
