#!/usr/bin/env bash
# Install the Debian packages given as arguments when any is missing.
# Quick when all are present: one dpkg-query, no apt.
set -euo pipefail
SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo

# `localhost` must resolve (NATS URLs, TLS names and the tests use it).
# Debian's installer and cloud images always write it into /etc/hosts; a
# minimal root (debootstrap, mmdebstrap, some containers) has no /etc/hosts
# at all.  Only then are Debian's two standard lines added.
if ! getent hosts localhost >/dev/null; then
    echo "deps: 'localhost' does not resolve; adding Debian's standard" \
         "localhost lines to /etc/hosts" >&2
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        | $SUDO tee -a /etc/hosts >/dev/null
fi

missing=()
for p in "$@"; do
    s=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $s == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "deps: installing ${missing[*]}" >&2
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
