#!/usr/bin/perl
# The webhook against hostile senders (docs/security.md), real nginx and
# nats-server:
#  - only application/json is stored: no Content-Type, text/plain, forms,
#    multipart (all a browser posts cross-site without a preflight) and
#    other types get 415, and GIFTS holds nothing new;
#  - gift_webhook_secret_file: several secrets (rotation), re-read on
#    reload, and refused at start when it holds no usable secret;
#  - gift_webhook_signature_skew: 30 s into the future by default; the
#    window plus the skew beyond GIFTS' 10-minute duplicate window makes
#    `nginx -t` fail;
#  - a captured request replayed is never stored twice.

use strict;
use warnings;
use Test::More;
use Digest::SHA qw(hmac_sha256_hex);
use IO::Socket::INET;
use lib 't/lib';
use GiftTest;

my $JSON = $GiftTest::JSON;
my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

my $rnd = sprintf('%08x%08x', int(rand(2**32)), int(rand(2**32)));
my $K1 = "file-key-one-$rnd";
my $K2 = "file-key-two-$rnd";
my $K3 = "file-key-new-$rnd";

my $dir = GiftTest::tempdir();
my $secrets = "$dir/gift.secrets";
GiftTest::spurt($secrets, "# rotation: old, then new\n$K1\n\n  $K2  \r\n");
chmod 0600, $secrets;

my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    workers => 1,
    webhook => "gift_webhook_secret_file $secrets;",
    server => 'location = /gift-open { gift_webhook; }',
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /connected to NATS/;
}), 'worker connected to NATS');
my $port = $ngx->port;

my $n = 0;
sub body {
    $n++;
    return $JSON->encode({ event => 'gift', platform => 'tiktok',
        userId => "hostile_$n", giftName => 'Motor', diamond => 10,
        quantity => 1, timestamp => 1700000000000 + $n,
        eventId => "hostile-$$-$n" });
}

sub sig {
    my ($key, $body, $t) = @_;
    $t //= time;
    return "t=$t,v1=" . hmac_sha256_hex("$t.$body", $key);
}

# A POST written by hand: exactly the headers given, nothing added.
sub raw_post {
    my ($path, $headers, $body) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
        Proto => 'tcp', Timeout => 5) or die "connect: $!";
    print $s "POST $path HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        . $headers . 'Content-Length: ' . length($body) . "\r\n\r\n$body";
    local $/;
    my $res = <$s> // '';
    close $s;
    my ($st) = $res =~ m{^HTTP/1\.1 (\d+)};
    my ($b) = $res =~ /\r\n\r\n(.*)\z/s;
    return ($st // 0, eval { $JSON->decode($b // '') } // {});
}

sub stored_count { GiftTest::stream_info($nats->url)->{GIFTS}{messages} // 0 }

# ------------------------------------------------------------ content types

my $before = stored_count();
for my $ct (undef, 'text/plain', 'text/plain;charset=UTF-8',
    'application/x-www-form-urlencoded',
    'multipart/form-data; boundary=----x', 'application/vnd.gift+json',
    'application/jsonp', 'text/json', '')
{
    my $name = !defined $ct ? 'no Content-Type'
        : $ct eq '' ? 'an empty Content-Type' : "Content-Type $ct";
    my ($st, $d) = raw_post('/gift-open',
        defined $ct ? "Content-Type: $ct\r\n" : '', body());
    is_deeply([$st, $d->{error}], [415, 'unsupported_media_type'],
        "$name: 415 unsupported_media_type");
}
is(stored_count(), $before, 'none of them reached GIFTS');

for my $ct ('application/json', 'application/json; charset=utf-8',
    'Application/JSON;charset=UTF-8')
{
    my ($st, $d) = raw_post('/gift-open', "Content-Type: $ct\r\n", body());
    is($st, 202, "Content-Type $ct: 202") or diag explain $d;
}
is(stored_count(), $before + 3, 'those three are stored');

# ------------------------------------------------------------ secret file

sub signed {
    my ($key, $t, $b) = @_;
    $b //= body();
    return raw_post('/gift', "Content-Type: application/json\r\n"
        . 'X-Gift-Signature: ' . sig($key, $b, $t) . "\r\n", $b);
}

my ($st, $d) = signed($K1);
is($st, 202, 'secret file: the first secret signs');
($st, $d) = signed($K2);
is($st, 202, 'secret file: the second (spaces and CR trimmed) too');
($st, $d) = signed($K3);
is_deeply([$st, $d->{error}], [401, 'signature_invalid'],
    'a secret not in the file: 401 signature_invalid');
($st, $d) = raw_post('/gift', "Content-Type: application/json\r\n", body());
is_deeply([$st, $d->{error}], [401, 'signature_missing'],
    'unsigned: 401 signature_missing');

# a captured request, replayed: answered, never stored twice
{
    my $b = body();
    my $h = "Content-Type: application/json\r\nX-Gift-Signature: "
        . sig($K1, $b) . "\r\n";
    my ($s1, $d1) = raw_post('/gift', $h, $b);
    my ($s2, $d2) = raw_post('/gift', $h, $b);
    is_deeply([$s1, $d1->{duplicate} ? 1 : 0], [202, 0], 'captured request');
    is_deeply([$s2, $d2->{duplicate} ? 1 : 0, $d2->{seq}],
        [202, 1, $d1->{seq}], 'replayed: a duplicate of the same seq');
}

# ------------------------------------------------------------ skew

{
    my $now = time;
    ($st, $d) = signed($K1, $now + 60);
    is_deeply([$st, $d->{error}], [401, 'signature_expired'],
        't 60 s ahead (past the 30 s default skew): 401 signature_expired');
    ($st, $d) = signed($K1, $now + 20);
    is($st, 202, 't 20 s ahead: 202');
    ($st, $d) = signed($K1, $now - 290);
    is($st, 202, 't 290 s old (inside the 300 s window): 202');
    ($st, $d) = signed($K1, $now - 320);
    is_deeply([$st, $d->{error}], [401, 'signature_expired'],
        't 320 s old: 401 signature_expired');
}

# ------------------------------------------------------------ reload

GiftTest::spurt($secrets, "$K3\n");
$ngx->reload;
($st, $d) = signed($K3);
is($st, 202, 'reload re-reads the file: the new secret signs');
($st, $d) = signed($K1);
is_deeply([$st, $d->{error}], [401, 'signature_invalid'],
    'and the removed one no longer does');
unlike(GiftTest::slurp($ngx->error_log), qr/\Q$K1\E|\Q$K3\E/,
    'no secret in the error log');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

# ------------------------------------------------------------ nginx -t

# nginx -t on a configuration with $webhook in the webhook location
sub nginx_t {
    my ($webhook) = @_;
    my $t = GiftTest::Nginx->new(webhook => $webhook, log_level => 'info',
        nats_url => $nats->url);
    $_ //= '' for @$t{qw(main http server listen)};
    $t->write_conf;
    my $d = $t->dir;
    my $o = `@{[GiftTest::nginx_env()]}nginx -t -p '$d/' -c '$d/nginx.conf' -e '$d/error.log' 2>&1`;
    return ($? >> 8, $o);
}

my ($code, $msg) = nginx_t('gift_webhook_signature_window 300s;');
is($code, 0, 'nginx -t: window 300 s + default skew 30 s is fine')
    or diag $msg;
($code, $msg) = nginx_t('gift_webhook_signature_window 590s;');
isnt($code, 0, 'nginx -t: window 590 s + skew 30 s refused');
like($msg, qr/gift_webhook_signature_window 590 plus gift_webhook_signature_skew 30.*duplicate window/,
    'naming both settings and the duplicate window');
($code, $msg) = nginx_t('gift_webhook_signature_window 300s; '
    . 'gift_webhook_signature_skew 301s;');
isnt($code, 0, 'nginx -t: window 300 s + skew 301 s refused');
($code, $msg) = nginx_t('gift_webhook_signature_window 570s; '
    . 'gift_webhook_signature_skew 30s;');
is($code, 0, 'nginx -t: 570 + 30 = 600 s is fine') or diag $msg;

GiftTest::spurt("$dir/short", "too-short\n");
($code, $msg) = nginx_t("gift_webhook_secret_file $dir/short;");
isnt($code, 0, 'nginx -t: a secret file with a short secret refused');
like($msg, qr/too short/, 'saying so');
GiftTest::spurt("$dir/empty", "# nothing yet\n\n");
($code, $msg) = nginx_t("gift_webhook_secret_file $dir/empty;");
isnt($code, 0, 'nginx -t: a secret file with no secret refused');
($code, $msg) = nginx_t("gift_webhook_secret_file $dir/missing;");
isnt($code, 0, 'nginx -t: a missing secret file refused');
GiftTest::spurt("$dir/open", "$K1\n");
chmod 0644, "$dir/open";
($code, $msg) = nginx_t("gift_webhook_secret_file $dir/open;");
is($code, 0, 'a world-readable secret file is accepted');
like($msg, qr/readable by every user/, 'with a warning');

# ------------------------------------------------------------ giftctl setup

# A GIFTS stream made by hand with a 1-minute duplicate window: setup keeps
# it (it never edits a stream) but fails, naming the setting.
{
    require GiftStream;
    my $n2 = GiftTest::start_nats();
    my $nc = GiftStream::nats_connect($n2->port);
    my $r = $nc->js_publish('$JS.API.STREAM.CREATE.GIFTS', $JSON->encode({
        name => 'GIFTS', subjects => ['gift.events.>'], storage => 'file',
        retention => 'limits', discard => 'new',
        duplicate_window => 60_000_000_000 }));
    ok($r->{config}, 'a GIFTS stream with a 60 s duplicate window')
        or diag explain $r;
    my ($o, $c) = GiftTest::giftctl($n2->url, 'setup');
    is($c, 1, 'giftctl setup exits 1');
    like($o, qr/duplicate window \(duplicate_window\) of 60 s, shorter than 600 s/,
        'naming the setting') or diag $o;
    $nc->close;

    # the dispatcher warns about it at start, in the webhook's words, and
    # keeps working (it cannot know nginx's settings; nginx warns on its own)
    require GiftDispatch;
    my $mq = GiftDispatch::start_mosquitto();
    my $d = GiftDispatch::start_dispatcher(nats_url => $n2->url,
        mqtt_port => $mq->port);
    ok(GiftTest::wait_until(20, sub {
        $d->log_text =~ /stream GIFTS: its duplicate window \(60 s\) is shorter than the 600 s that nginx's gift_webhook_signature_window \+ gift_webhook_signature_skew may span/
    }), 'the dispatcher warns at start, naming both settings')
        or diag $d->log_text;
    ok(kill(0, $d->pid), '... and keeps running');
    $d->stop;
    $mq->stop;
}

done_testing();
