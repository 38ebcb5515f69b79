#!/usr/bin/perl
# A real browser as the attacker (Debian's Chromium, driven by
# playwright-core through t/browser/driver.mjs), against nginx serving
# nginx.conf.example itself (rendered as `make run` renders it):
#  - a page of another origin posts to /gift with fetch(..., {mode:
#    "no-cors"}) every body a browser sends without a preflight (text,
#    a Blob without a type, a form, multipart): each reaches nginx, gets
#    415, and nothing is stored; a JSON post needs a preflight, which the
#    webhook does not grant;
#  - that page cannot open /gift/ws (Origin refused: 403); the overlay,
#    served by the same server, can;
#  - DNS rebinding: a name that resolves to 127.0.0.1 (Chromium's
#    --host-resolver-rules) reaches only the example's default server,
#    which answers 421 to everything.

use strict;
use warnings;
use Test::More;
use HTTP::Tiny;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftBrowser;

my $ROOT = GiftTest::root();

sub which {
    my ($name) = @_;
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$name" if -x "$d/$name";
    }
    return undef;
}
my $node = which('node');
GiftTest::skip_all_unless($node, 'node not found (playwright-core drives Chromium)');
my $chromium = $ENV{GIFT_CHROMIUM} // '/usr/bin/chromium';
GiftTest::skip_all_unless(-x $chromium, "$chromium not found");
GiftTest::skip_all_unless(-f "$ROOT/node_modules/playwright-core/package.json",
                          'node_modules/playwright-core missing: npm ci');

$SIG{ALRM} = sub { die "t/41-browser-hostile.t: over 90 s, giving up\n" };
alarm 88;

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');

# ------------------------------------------------------------ nginx

# nginx.conf.example as scripts/run.sh renders it, plus a second server on
# another port: the attacker's site (another origin).
my $dir = GiftTest::tempdir();
my $port = GiftTest::free_port();
my $evil = GiftTest::free_port();
my $conf = GiftTest::slurp("$ROOT/nginx.conf.example");
my $module = "$ROOT/build/ngx_http_gift_module.so";
my $natsurl = $nats->url;
$conf =~ s#/usr/lib/nginx/modules/ngx_http_gift_module.so#$module#;
$conf =~ s#/var/log/nginx/gift-error.log notice#$dir/error.log info#;
$conf =~ s#/run/nginx-gift.pid#$dir/nginx.pid#;
$conf =~ s#/usr/share/gift/web#$ROOT/web#;
$conf =~ s#127.0.0.1:8080#127.0.0.1:$port#g;
$conf =~ s#nats://127.0.0.1:14222#$natsurl#;
$conf =~ s#^worker_processes auto;#worker_processes 1;\ndaemon off;#m;
$conf =~ s#^http \{#http {
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$evil;
        location / {
            default_type text/html;
            return 200 "<!doctype html><title>another site</title><p>hi";
        }
    }#m;
my $ngx = GiftTest::start_nginx(dir => $dir, port => $port, conf => $conf);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/;
}), 'nginx.conf.example: the worker follows GIFT_ACKS');

my $http = HTTP::Tiny->new(timeout => 5);
# A request with the Host header given (HTTP::Tiny makes its own).
sub request {
    my ($method, $path, $host, $headers, $body) = @_;
    $body //= '';
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
        Proto => 'tcp', Timeout => 5) or die "connect: $!";
    print $s "$method $path HTTP/1.1\r\nHost: $host\r\nConnection: close\r\n"
        . ($headers // '') . 'Content-Length: ' . length($body)
        . "\r\n\r\n$body";
    local $/;
    my $res = <$s> // '';
    my ($st) = $res =~ m{^HTTP/1\.1 (\d+)};
    return $st // 0;
}
sub get { request('GET', @_) }

sub metric {
    my ($code) = @_;
    my $body = $http->get("http://127.0.0.1:$port/gift/status")->{content};
    my ($v) = $body =~ /^gift_webhooks_total\{status="\d+",code="\Q$code\E"\} (\d+)/m;
    return $v // 0;
}

sub stored { GiftTest::stream_info($nats->url)->{GIFTS}{messages} // 0 }

# ------------------------------------------------------------ Host

for my $h ("127.0.0.1:$port", "localhost:$port", "[::1]:$port") {
    is(get('/', $h), 200, "Host $h: the overlay page");
}
for my $h ("evil.example:$port", 'evil.example', "192.168.1.5:$port") {
    is(get($_, $h), 421, "Host $h: $_ gets 421")
        for '/', '/gift/events', '/gift/ws', '/gift/status';
}
is(request('POST', '/gift', "evil.example:$port",
    "Content-Type: application/json\r\n", '{"event":"gift","platform":'
    . '"tiktok","userId":"u","giftName":"Motor","diamond":10,"quantity":1,'
    . '"timestamp":1700000000000}'), 421,
    'Host evil.example: POST /gift gets 421');

# ------------------------------------------------------------ browser

local $ENV{GIFT_CHROMIUM_HOST_RULES} = 'MAP evil.example 127.0.0.1';
my $b = GiftBrowser->start($node, "$ROOT/t/browser/driver.mjs");
ok($b, 'Chromium started (' . ($b->{version} // '?') . ')');

my $r = $b->cmd(goto => url => "http://127.0.0.1:$evil/");
is($r->{status}, 200, "a page of another origin (127.0.0.1:$evil)");

my $stored0 = stored();
my $refused0 = metric('unsupported_media_type');
my $gift = '{"event":"gift","platform":"tiktok","userId":"evil",'
    . '"giftName":"Motor","diamond":10,"quantity":1,'
    . '"timestamp":1700000000000,"eventId":"evil-' . $$ . '"}';
my $posts = $b->cmd(eval => expr => <<"JS");
(async () => {
    const url = 'http://127.0.0.1:$port/gift';
    const body = '$gift';
    const form = new FormData();
    form.append('gift', body);
    const out = {};
    const tries = {
        text: { body },
        blob: { body: new Blob([body]) },
        urlencoded: { body: new URLSearchParams({ gift: body }) },
        multipart: { body: form },
    };
    for (const [name, init] of Object.entries(tries)) {
        try {
            const res = await fetch(url, { method: 'POST', mode: 'no-cors',
                ...init });
            out[name] = res.type;
        } catch (e) {
            out[name] = 'error: ' + e.message;
        }
    }
    try {
        await fetch(url, { method: 'POST', mode: 'cors', body,
            headers: { 'Content-Type': 'application/json' } });
        out.json = 'sent';
    } catch (e) {
        out.json = 'refused';
    }
    return out;
})()
JS
is_deeply($posts, { text => 'opaque', blob => 'opaque',
    urlencoded => 'opaque', multipart => 'opaque', json => 'refused' },
    'no-cors posts went out (opaque answers); the JSON one was refused '
    . 'by the browser') or diag explain $posts;
ok(GiftTest::wait_until(5, sub {
    metric('unsupported_media_type') - $refused0 >= 4 }),
    'nginx answered all four no-cors posts 415');
is(stored(), $stored0, 'GIFTS holds nothing new');

my $open_ws = sub {
    my ($url) = @_;
    return $b->cmd(eval => expr => <<"JS");
new Promise((resolve) => {
    const ws = new WebSocket('$url');
    ws.onopen = () => { ws.close(1000); resolve('open'); };
    ws.onclose = (e) => resolve('closed ' + e.code);
    setTimeout(() => resolve('timeout'), 8000);
})
JS
};
is($open_ws->("ws://127.0.0.1:$port/gift/ws"), 'closed 1006',
    'that page cannot open /gift/ws');
like(GiftTest::slurp($ngx->error_log),
    qr/refused origin "http:\/\/127\.0\.0\.1:$evil"/,
    'refused for its Origin (403)');

$r = $b->cmd(goto => url => "http://127.0.0.1:$port/");
is($r->{status}, 200, 'the overlay page (same origin)');
is($open_ws->("ws://127.0.0.1:$port/gift/ws"), 'open',
    'opens /gift/ws');

# DNS rebinding: the attacker's name now points at 127.0.0.1
$r = $b->cmd(goto => url => "http://evil.example:$port/");
is($r->{status}, 421, 'rebinding: http://evil.example:PORT/ gets 421');
my $read = $b->cmd(eval => expr => <<'JS');
(async () => {
    const res = await fetch('/gift/events?last_event_id=0');
    return res.status;
})()
JS
is($read, 421, 'and its script reads no acknowledgement (421)');
is($open_ws->("ws://evil.example:$port/gift/ws"), 'closed 1006',
    'nor opens the WebSocket');

# ------------------------------------------------------------ teardown

my $profile = $b->{profile};
is($b->close, 0, 'driver closed the browser');
ok(!GiftBrowser::browser_pids($profile), 'no Chromium process left');
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
alarm 0;

done_testing();
