#!/usr/bin/perl
# The whole path over TLS with NKey authentication, as in production: a
# nats-server with a certificate of a CA the test makes and NKey users;
# nginx (tls://, gift_nats_ssl_trusted_certificate, gift_nats_nkey), the
# dispatcher (tls_ca, nkey) and giftctl (--tls-ca, --nkey).  Gifts POSTed
# to the webhook are answered 202, stored, turn the motors, and their
# GiftAcks reach an SSE client in order; after a NATS restart the worker
# resolves the name again, comes back over TLS, and the stream goes on with
# no gap and no duplicate.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;
use GiftStream;
use GiftNatsAuth;

my $dir = GiftTest::tempdir();
GiftNatsAuth::make_ca($dir, 'ca');
GiftNatsAuth::make_cert($dir, 'server', 'ca');
my ($nseed, $npub) = GiftNatsAuth::nkey('user');      # nginx
my ($dseed, $dpub) = GiftNatsAuth::nkey('user');      # dispatcher, giftctl
GiftTest::spurt("$dir/nginx.nk", "$nseed\n");
GiftTest::spurt("$dir/disp.nk", "$dseed\n");
chmod 0600, "$dir/nginx.nk", "$dir/disp.nk";

GiftTest::make_path("$dir/nats");
my $nats = GiftNatsAuth::start_nats("$dir/nats", <<"EOF");
tls {
  cert_file: "$dir/server.pem"
  key_file: "$dir/server.key"
  timeout: 2
}
authorization { users: [ { nkey: $npub }, { nkey: $dpub } ] }
EOF
my $url = 'tls://localhost:' . $nats->port;
@GiftTest::GIFTCTL_OPTS = ('--tls-ca', "$dir/ca.pem", '--nkey',
    "$dir/disp.nk");

my ($out, $rc) = GiftTest::giftctl($url, 'setup');
is($rc, 0, 'giftctl --tls-ca --nkey setup') or diag $out;

my $st = GiftTB::start_stack(dir => $dir, motors => 8);
my $tb = $st->{motors};
my $disp = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $url,
    mqtt_port => $st->{port}, extra_mqtt => $st->conf(1),
    extra_nats => "tls_ca = \"$dir/ca.pem\"; nkey = \"$dir/disp.nk\";");
like($disp->log_text, qr/NATS: connected to/,
    'the dispatcher connected over TLS with its NKey');

my $ngx = GiftTest::start_nginx(dir => "$dir/ngx", nats_url => $url,
    http => "gift_nats_ssl_trusted_certificate $dir/ca.pem;"
        . " gift_nats_nkey $dir/nginx.nk;",
    server => 'location = /gift/events { gift_sse; }');
my $log = sub { GiftTest::slurp($ngx->error_log) };
ok(GiftTest::wait_until(20, sub {
    my @n = $log->() =~ /following GIFT_ACKS/g;
    @n >= 2 }), 'both workers connected over TLS and follow GIFT_ACKS');
is(() = $log->() =~ /connected to NATS \S+ over TLS/g, 2,
    '... each over TLS');

my $sse = GiftStream::SSE->new(port => $ngx->port);
is($sse->status, 200, 'SSE client attached');

sub burst {
    my ($tag, $n) = @_;
    my @gifts = map { GiftTest::gift(eventId => "$tag-$_", giftName => 'Motor',
        diamond => 10, quantity => 1, userId => "u$_") } 1 .. $n;
    my @r = GiftTest::post_many($ngx->port, 5, @gifts);
    return scalar grep { $_ && $_->[1] == 202 } @r;
}

sub acks_for {
    my ($tag, $n) = @_;
    my (@ev, %seen);
    my $end = time + 30;
    while (keys %seen < $n && time < $end) {
        for my $e ($sse->take(1, 1)) {
            push @ev, $e;
            my $id = $e->{json} && $e->{json}{eventId} // '';
            $seen{$id}++ if $id =~ /^\Q$tag\E-/;
        }
    }
    return (\@ev, \%seen);
}

is(burst('a', 20), 20, '20 gifts accepted over TLS');
my ($ev, $seen) = acks_for('a', 20);
is(scalar(keys %$seen), 20, 'the SSE client got the 20 GiftAcks');
is(scalar(grep { $_ > 1 } values %$seen), 0, '... each once');
is(scalar(grep { ($_->{json}{status} // '') ne 'ok' } @$ev), 0,
    '... all ok');
my @ids = map { $_->{id} } @$ev;
is_deeply(\@ids, [ sort { $a <=> $b } @ids ], '... in sequence order');
ok(GiftTest::wait_until(10, sub {
    ($tb->totals->{devices}{motor_03}{rounds} // 0) == 200 }),
    'motor_03 turned 20 x 10 rounds');

# --- NATS restarts: the worker comes back over TLS, the stream goes on
my $last = $ids[-1];
my $off = length $log->();
$nats->restart;
ok(GiftTest::wait_until(20, sub {
    my @n = substr($log->(), $off) =~ /connected to NATS \S+ over TLS/g;
    @n >= 2 }), 'after a NATS restart both workers are back over TLS');
like(substr($log->(), $off), qr/NATS server "localhost" resolved/,
    '... the name resolved again (off the event loop)');
ok(GiftTest::wait_until(20, sub {
    my ($st) = GiftTest::post_gift($ngx->port, GiftTest::gift(
        eventId => 'probe', giftName => 'Motor'));
    $st == 202 }), 'gifts accepted again');
is(burst('b', 10), 10, '10 more gifts accepted');
($ev, $seen) = acks_for('b', 10);
is(scalar(keys %$seen), 10, 'their GiftAcks reached the same SSE client');
my @after = map { $_->{id} } @$ev;
is(scalar(grep { $_ <= $last } @after), 0, 'no duplicate after the restart');
is_deeply(\@after, [ $last + 1 .. $last + @after ],
    'no gap: the sequence goes on');

# --- a reload: the master reads the key files again, new workers connect
$off = length $log->();
$ngx->reload;
ok(GiftTest::wait_until(20, sub {
    my @n = substr($log->(), $off) =~ /connected to NATS \S+ over TLS/g;
    @n >= 2 }), 'after a reload the new workers connect over TLS');
my ($st) = GiftTest::post_gift($ngx->port, GiftTest::gift(eventId => 'c-1',
    giftName => 'Motor'));
is($st, 202, '... and gifts are accepted');

$disp->stop;
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
