#!/usr/bin/perl
# A GIFT_ACKS message as large as the server's max_payload (here 4 MiB, as
# a server may be configured) reaches the worker's NATS connection: it is
# read whole (a GiftAck too large for the clients' frames is skipped), the
# connection stays up (no reconnect loop), and the acknowledgements after
# it stream on.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftStream;
use GiftNatsAuth;

my $dir = GiftTest::tempdir();
my $MAX = 4 * 1024 * 1024;
my $nats = GiftNatsAuth::start_nats($dir, "max_payload: $MAX");
GiftTest::giftctl($nats->url, 'setup');

my $ngx = GiftTest::start_nginx(nats_url => $nats->url, workers => 1,
    server => 'location = /gift/events { gift_sse; }');
my $log = sub { GiftTest::slurp($ngx->error_log) };
ok(GiftTest::wait_until(10, sub { $log->() =~ /following GIFT_ACKS/ }),
    'the worker follows GIFT_ACKS');

my $sse = GiftStream::SSE->new(port => $ngx->port);
is($sse->status, 200, 'SSE client attached');

my $nc = GiftStream::nats_connect($nats->port);
my %base = (deviceId => 'motor_01', rounds => 10, status => 'ok',
    attempts => 1, platform => 'tiktok', roomId => 'r', userId => 'u',
    giftName => 'Motor', diamond => 10, quantity => 1);

my $pa = $nc->publish_ack(%base, eventId => 'small-1', userName => 'A');
ok($pa->{seq}, 'a small GiftAck stored');
my @ev = $sse->take(1, 10);
is($ev[0] && $ev[0]{json}{eventId}, 'small-1', '... and streamed');

# the largest message the server takes: max_payload minus the header
my $hdr = length("NATS/1.0\r\nNats-Msg-Id: big-1:ack\r\n\r\n");
my $pad = $MAX - $hdr - 200;
$pa = $nc->publish_ack(%base, eventId => 'big-1', userName => 'x' x $pad);
ok($pa->{seq}, 'a GiftAck of nearly max_payload (4 MiB) stored');

$pa = $nc->publish_ack(%base, eventId => 'small-2', userName => 'B');
my $want = $pa->{seq};
my ($got) = grep { ($_->{json}{eventId} // '') eq 'small-2' }
    map { $sse->take(1, 2) } 1 .. 10;
ok($got, 'the acknowledgement after it is streamed');
is($got && $got->{id}, $want, '... with its sequence');

unlike($log->(), qr/disconnected from NATS|too long|impossible size/,
    'the connection stayed up: no reconnect');
is(() = $log->() =~ /connected to NATS/g, 1, 'one connection all along');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
