#!/usr/bin/env bash
# make install: put the built module, daemon, tools, configuration, systemd
# unit, overlay and documentation where Debian keeps such things.
#
#   DESTDIR=/tmp/stage make install     stage into a directory (packaging)
#   sudo make install                   install on this machine
#
# Environment: DESTDIR (default empty: the real root), BUILD (default build,
# where `make` left the artifacts), NGINX_ENABLE=1 (also enable the module
# for the system nginx, like Debian's libnginx-mod-* postinst does).
#
# Paths (no PREFIX: these are Debian's):
#   /usr/lib/nginx/modules/ngx_http_gift_module.so
#   /usr/share/nginx/modules-available/mod-http-gift.conf   load_module snippet
#   /usr/sbin/gift-dispatcher, /usr/bin/giftctl
#   /etc/gift/gift-dispatcher.conf        from the example; never overwritten
#   /lib/systemd/system/gift-dispatcher.service
#   /usr/lib/sysusers.d/gift-dispatcher.conf    the unprivileged user
#   /usr/share/gift/web/                  the overlay (nginx.conf.example's root)
#   /usr/share/gift/thingsboard/gift-rule-chain.json
#   /usr/share/doc/gift/                  README, docs, nginx.conf.example,
#                                         gift-dispatcher.conf.example
#
# It starts, stops and restarts nothing; it prints what it did.
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
BUILD=${BUILD:-build}
NGINX_ENABLE=${NGINX_ENABLE:-0}

MODULE=ngx_http_gift_module.so
SNIPPET=mod-http-gift.conf

for f in "$BUILD/$MODULE" "$BUILD/gift-dispatcher" "$BUILD/giftctl"; do
    if [[ ! -f $f ]]; then
        echo "install: $f is missing; run 'make' first" >&2
        exit 1
    fi
done

say() { printf '  %-8s %s\n' "$1" "$2"; }

# put MODE SRC DST: copy next to the destination, then rename over it, so a
# running nginx or dispatcher keeps the file it has mapped (no "text file
# busy", no half-written library).
put() {
    local mode=$1 src=$2 dst=$DESTDIR$3
    mkdir -p "$(dirname "$dst")"
    install -m "$mode" "$src" "$dst.new.$$"
    mv -f "$dst.new.$$" "$dst"
    say install "$3"
}

echo "install: into ${DESTDIR:-/}"

# ---------------------------------------------------------------- nginx
put 0644 "$BUILD/$MODULE" "/usr/lib/nginx/modules/$MODULE"
# The same one line as Debian's own snippets (mod-http-echo.conf, ...):
# relative to nginx's prefix /usr/share/nginx, whose modules/ is a symlink
# to /usr/lib/nginx/modules.
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
printf 'load_module modules/%s;\n' "$MODULE" >"$tmp"
put 0644 "$tmp" "/usr/share/nginx/modules-available/$SNIPPET"
if [[ $NGINX_ENABLE == 1 ]]; then
    mkdir -p "$DESTDIR/etc/nginx/modules-enabled"
    ln -sfn "/usr/share/nginx/modules-available/$SNIPPET" \
        "$DESTDIR/etc/nginx/modules-enabled/50-$SNIPPET"
    say link "/etc/nginx/modules-enabled/50-$SNIPPET"
fi

# ---------------------------------------------------------------- daemon, tools
put 0755 "$BUILD/gift-dispatcher" /usr/sbin/gift-dispatcher
put 0755 "$BUILD/giftctl" /usr/bin/giftctl
put 0644 packaging/gift-dispatcher.service \
    /lib/systemd/system/gift-dispatcher.service
put 0644 packaging/gift-dispatcher.sysusers \
    /usr/lib/sysusers.d/gift-dispatcher.conf

# On the real root, as root: create the user now (sysusers is idempotent).
have_user=0
if [[ -z $DESTDIR && $(id -u) == 0 ]]; then
    if ! getent passwd gift-dispatcher >/dev/null; then
        if command -v systemd-sysusers >/dev/null; then
            systemd-sysusers /usr/lib/sysusers.d/gift-dispatcher.conf
        else
            useradd --system --home-dir /nonexistent --no-create-home \
                --shell /usr/sbin/nologin gift-dispatcher
        fi
        say user "gift-dispatcher (created)"
    fi
    getent passwd gift-dispatcher >/dev/null && have_user=1
fi

# The configuration: from the example, never over an existing file (it may
# hold an access token or NATS credentials: readable by the daemon's group
# only).
conf=/etc/gift/gift-dispatcher.conf
if [[ -e $DESTDIR$conf ]]; then
    say keep "$conf (exists; the new example is /usr/share/doc/gift/gift-dispatcher.conf.example)"
else
    mkdir -p "$DESTDIR/etc/gift"
    install -m 0640 dispatcher/gift-dispatcher.conf.example "$DESTDIR$conf"
    if [[ $have_user == 1 ]]; then
        chgrp gift-dispatcher "$DESTDIR/etc/gift" "$DESTDIR$conf"
        chmod 0750 "$DESTDIR/etc/gift"
    fi
    say install "$conf"
fi

# ---------------------------------------------------------------- overlay, data
for f in web/*; do
    [[ -f $f ]] && put 0644 "$f" "/usr/share/gift/web/${f#web/}"
done
put 0644 packaging/thingsboard/gift-rule-chain.json \
    /usr/share/gift/thingsboard/gift-rule-chain.json

# ---------------------------------------------------------------- documentation
doc=/usr/share/doc/gift
put 0644 README.md "$doc/README.md"
for f in docs/*.md; do
    put 0644 "$f" "$doc/${f#docs/}"
done
put 0644 nginx.conf.example "$doc/nginx.conf.example"
put 0644 dispatcher/gift-dispatcher.conf.example \
    "$doc/gift-dispatcher.conf.example"

cat <<EOF
install: done.  Nothing was started or restarted.  Next steps:
  - nginx: include the module in your configuration, either
      ln -s /usr/share/nginx/modules-available/$SNIPPET /etc/nginx/modules-enabled/50-$SNIPPET
    (for /etc/nginx/nginx.conf, which includes modules-enabled/*.conf), or
      load_module /usr/lib/nginx/modules/$MODULE;
    at the top of a configuration of your own (see $doc/nginx.conf.example);
    then nginx -t && systemctl reload nginx
  - dispatcher: edit $conf (gift-dispatcher -t -c $conf checks it), then
      systemctl daemon-reload && systemctl enable --now gift-dispatcher
  - streams: giftctl -s nats://HOST:4222 setup   (--replicas 3 on a cluster)
EOF
if [[ -n $DESTDIR ]]; then
    echo "  - staged: the package's postinst should run systemd-sysusers and"
    echo "    chgrp gift-dispatcher $conf (mode 0640)"
fi
