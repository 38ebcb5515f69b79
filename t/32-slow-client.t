#!/usr/bin/perl
# A client that never reads is cut off at gift_sse_max_backlog, while a
# normal client keeps receiving everything, in order; the worker's memory
# stays bounded.  (How fast the reading client is served is measured by
# make bench, not here.)

use strict;
use warnings;
use Test::More;
use IO::Select;
use Socket qw(SOL_SOCKET SO_RCVBUF);
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftStream;

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');

# the stalled clients come in through a listener with a small send buffer,
# so that their backlog builds up in nginx quickly; the reading client uses
# the ordinary one
my $port = GiftTest::free_port();
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url, workers => 1,
    http => 'gift_sse_max_backlog 256; gift_sse_heartbeat 60s; '
        . 'gift_sse_replay_max 5; '
        . "server { listen 127.0.0.1:$port sndbuf=8k; "
        . "location = /gift/events { gift_sse; } "
        . "location = /gift/ws { gift_websocket; } }",
    server => "location = /gift/events { gift_sse; }",
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/
}), 'worker follows GIFT_ACKS');

# a stalled reader: tiny receive buffer, never reads
sub stalled {
    my ($path, $extra) = @_;
    $extra //= '';
    my $s = IO::Socket::INET->new(Proto => 'tcp') or die $!;
    setsockopt($s, SOL_SOCKET, SO_RCVBUF, 2048);
    my $addr = Socket::sockaddr_in($port, Socket::inet_aton('127.0.0.1'));
    connect($s, $addr) or die "connect: $!";
    print $s "GET $path HTTP/1.1\r\nHost: x\r\n$extra\r\n";
    return $s;
}
my $slow = stalled('/gift/events');
my $slow_ws = stalled('/gift/ws', "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    . "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    . "Sec-WebSocket-Version: 13\r\n");
my $good = GiftStream::SSE->new(port => $ngx->port);
# the stalled clients are subscribed once nginx has answered them (the
# answer waits, unread, in their sockets)
for my $s ($slow, $slow_ws) {
    ok(IO::Select->new($s)->can_read(30), 'a stalled client is answered');
}

my ($worker) = $ngx->workers;
my $rss = sub {
    (GiftTest::slurp("/proc/$worker/status") =~ /VmRSS:\s+(\d+)/)[0]
};
my $rss0 = $rss->();

my $nc = GiftStream::nats_connect($nats->port);
my $name = 'x' x 250;
my (%sent, @lat);
my $N = 1500;
for my $i (1 .. $N) {
    my $t = time;
    my $seq = $nc->publish_ack(eventId => "s$i", deviceId => 'motor_01',
        rounds => 1, userName => $name, giftName => $name)->{seq};
    $sent{$seq} = $t;
    # read the good client as a browser would, as things arrive
    for my $e ($good->poll) {
        push @lat, time - $sent{$e->{id}} if $sent{$e->{id}};
    }
}
for my $e ($good->take($N - @lat, 120)) {
    push @lat, time - $sent{$e->{id}} if $sent{$e->{id}};
}
is(scalar(@lat), $N, 'the reading client got every acknowledgement');
@lat = sort { $a <=> $b } @lat;
my $p99 = $lat[int(0.99 * $#lat)];
diag(sprintf('reading client latency p50 %.2f ms, p99 %.2f ms',
    1000 * $lat[$#lat / 2], 1000 * $p99));

# paced, one at a time: publish -> received
my @paced;
for my $i (1 .. 30) {
    my $t = time;
    my $seq = $nc->publish_ack(eventId => "p$i", deviceId => 'motor_01',
        rounds => 1)->{seq};
    my ($e) = $good->take(1, 30);
    push @paced, time - $t if $e && $e->{id} == $seq;
}
@paced = sort { $a <=> $b } @paced;
is(scalar(@paced), 30, 'paced acknowledgements all received');
diag(sprintf('paced latency (publish + PubAck + delivery) p50 %.2f ms, '
    . 'max %.2f ms', 1000 * $paced[15], 1000 * $paced[-1]));

ok(GiftTest::wait_until(60, sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /closing stream: backlog full/g;
    @n >= 2;
}), 'both stalled clients (SSE and WebSocket) cut off at their backlog');

# the stalled sockets see the end once they read
for my $s ($slow, $slow_ws) {
    $s->blocking(0);
    my $end = time + 60;
    my $eof = 0;
    while (time < $end) {
        my $n = sysread($s, my $buf, 65536);
        if (defined $n && $n == 0) { $eof = 1; last }
        if (!defined $n && !$!{EAGAIN}) { $eof = 1; last }
        sleep 0.01 unless defined $n;
    }
    ok($eof, 'stalled connection closed by the server');
}

my $grow = $rss->() - $rss0;
diag("worker RSS grew by $grow KiB");
cmp_ok($grow, '<', 20 * 1024, 'worker memory bounded');

# a resumed client gets what it missed
my $back = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => $N + 30 - 5 });
my @back = $back->take(5, 30);
is_deeply([map { $_->{id} } @back], [$N + 30 - 4 .. $N + 30],
    'a cut-off client can resume: the 5 it missed, in order');
is_deeply([map { $_->{json}{eventId} } @back], [map { "p$_" } 26 .. 30],
    '... the last 5 acknowledgements, p26 to p30');

# a burst larger than the replay ring (5) and the backlog (256) arriving at
# once: a reading client gets all of it, in order, and is not cut off
my @burst = $nc->publish_acks_burst(map { { eventId => "b$_",
    deviceId => 'motor_02', rounds => 1 } } 1 .. 1500);
my @got = map { $_->{id} } $back->take(1500, 120);
is(scalar(@got), 1500, 'a burst of 1500 reaches a reading client whole');
is_deeply(\@got, \@burst, 'in order, none twice');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
