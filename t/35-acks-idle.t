#!/usr/bin/perl
# A worker without streaming clients stops following GIFT_ACKS
# (gift_sse_idle_follow): nats-server then has no consumer of its, and the
# worker no wake-up per acknowledgement.  The next client starts it again,
# and nothing a client is owed is lost or sent twice:
#  - a client resuming by Last-Event-ID gets the ring, then what went by
#    while nobody followed, in order, once;
#  - a client without Last-Event-ID gets what is stored after its response
#    (SSE and WebSocket);
#  - when more than gift_sse_replay_max went by, the ring starts afresh and
#    a client further behind gets an explicit `gap`, then the rest;
#  - across a nats-server restart while nobody follows.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftStream;

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url, workers => 1,
    http => 'gift_sse_replay_max 50; gift_sse_idle_follow 1s;',
    server => 'location = /gift/events { gift_sse; }'
        . ' location = /gift/ws { gift_websocket; }',
);
my $log = sub { GiftTest::slurp($ngx->error_log) };
sub count { my $re = $_[0]; my @n = $log->() =~ /$re/g; scalar @n }
ok(GiftTest::wait_until(10, sub { $log->() =~ /following GIFT_ACKS/ }),
    'the worker follows GIFT_ACKS');

my $nc = GiftStream::nats_connect($nats->port);
my $n = 0;
sub burst {
    my ($k) = @_;
    my @a = map { { eventId => 'i' . ($n + $_), deviceId => 'motor_01',
        rounds => 1 } } 1 .. $k;
    $n += $k;
    return $nc->publish_acks_burst(@a);
}
sub consumers {
    scalar @{$nc->js_publish('$JS.API.CONSUMER.NAMES.GIFT_ACKS', '')
        ->{consumers} || []};
}
sub ids { my ($c, $k, $t) = @_; map { $_->{id} } $c->take($k, $t // 10) }
sub paused { my ($k) = @_; GiftTest::wait_until(20,
    sub { count(qr/GIFT_ACKS no longer followed/) >= $k }) }

burst(10);                                                   # 1..10
ok(paused(1), 'no client for 1 s: the worker stops following');
like($log->(), qr/no longer followed after #10\b/, 'after #10, the last');
is(consumers(), 0, 'GIFT_ACKS has no consumer left');

burst(20);                                                   # 11..30
my $c = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => 5 });
is($c->status, 200, 'a client resuming after #5');
is(join(' ', ids($c, 25)), join(' ', 6 .. 30),
    'it gets 6..30: the ring, then what went by unfollowed, once each');
is(consumers(), 1, 'the worker follows again');

my $now = GiftStream::SSE->new(port => $ngx->port);
is($now->status, 200, 'a client without Last-Event-ID');
burst(1);                                                    # 31
is(join(' ', ids($now, 1)), '31', 'it gets what came after it, only');
is(join(' ', ids($c, 1)), '31', 'and so does the first');
$c->close;
$now->close;

# --- more than the ring went by: a client further behind gets a gap
ok(paused(2), 'no client again: not followed');
burst(100);                                                  # 32..131
$c = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => 31 });
my @ev = $c->take(51, 10);
is($ev[0]{event}, 'gap', 'a gap first');
is_deeply([@{$ev[0]{json} || {}}{qw(from to)}], [32, 81],
    'naming 32..81, what the ring no longer holds');
is(join(' ', map { $_->{id} } @ev[1 .. $#ev]), join(' ', 82 .. 131),
    'then 82..131 in order');
$c->close;

# --- parked: a WebSocket client without last_event_id
ok(paused(3), 'not followed');
burst(5);                                                    # 132..136
$now = GiftStream::SSE->new(port => $ngx->port);
is($now->status, 200, 'an SSE client without Last-Event-ID');
my $ws = GiftStream::WS->new(port => $ngx->port);
is($ws->status, 101, 'a WebSocket client');
burst(1);                                                    # 137
my @m = $ws->take(1, 10);
is(join(' ', map { $_->{seq} // 'notice' } @m), '137',
    'it gets what came after its 101, only');
is(join(' ', ids($now, 1)), '137', 'the SSE client too');
$ws->close;
$now->close;

# --- nats-server restarts while nobody follows
ok(paused(4), 'not followed');
$nats->stop;
$nats->start;
ok(GiftTest::wait_until(60, sub { count(qr/connected to NATS/) >= 2 }),
    'the worker reconnected');
is(consumers(), 0, 'and follows nothing, still without a client')
    if ($nc = GiftStream::nats_connect($nats->port));
burst(10);                                                   # 138..147
$c = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => 130 });
is(join(' ', ids($c, 17)), join(' ', 131 .. 147),
    'a client resuming after #130 gets 131..147, once each');
burst(3);                                                    # 148..150
is(join(' ', ids($c, 3)), '148 149 150', 'then live ones');
$c->close;

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
