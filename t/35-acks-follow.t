#!/usr/bin/perl
# How a worker follows GIFT_ACKS (its ordered consumer, on the worker's own
# NATS connection), through what can happen to that consumer: an SSE client
# that stays connected gets every acknowledgement once and in order
#  - when an operator deletes the consumer (no more heartbeats: the worker
#    notices within 15 s and makes a new one after the last sequence it has),
#  - when nats-server restarts on the same store (the consumer, in memory,
#    is gone: the worker makes a new one once it reconnects),
#  - when a burst is larger than what the server sends before it asks for
#    flow control.

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
    http => 'gift_sse_replay_max 100;',
    server => 'location = /gift/events { gift_sse; }',
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/
}), 'the worker follows GIFT_ACKS');

my $nc = GiftStream::nats_connect($nats->port);
my $n = 0;
sub burst {
    my ($k) = @_;
    my @a = map { { eventId => 'f' . ($n + $_), deviceId => 'motor_01',
        rounds => 1 } } 1 .. $k;
    $n += $k;
    return $nc->publish_acks_burst(@a);
}

my $c = GiftStream::SSE->new(port => $ngx->port);
is($c->status, 200, 'an SSE client');
my @got;
sub got_upto {
    my ($last, $timeout) = @_;
    my $end = time + $timeout;
    while (time < $end && (!@got || $got[-1] < $last)) {
        push @got, map { $_->{id} } $c->take(1, 0.5);
    }
    return "@got" eq join(' ', 1 .. $last);
}

burst(20);
ok(got_upto(20, 10), 'acks 1..20, in order');

# --- the consumer deleted behind the worker's back
my $names = $nc->js_publish('$JS.API.CONSUMER.NAMES.GIFT_ACKS', '');
my @cons = @{$names->{consumers} || []};
is(scalar @cons, 1, 'GIFT_ACKS has one consumer: the worker\'s');
for (@cons) {
    my $r = $nc->js_publish("\$JS.API.CONSUMER.DELETE.GIFT_ACKS.$_", '');
    ok($r->{success}, "consumer $_ deleted");
}
# the worker notices 15 s without a heartbeat (a generous deadline here)
burst(20);
ok(got_upto(40, 90), 'after the deletion: 21..40, none missing or twice');
like(GiftTest::slurp($ngx->error_log),
    qr/GIFT_ACKS consumer replaced \(no heartbeat/,
    'the worker says why it replaced the consumer');
is(scalar @{$nc->js_publish('$JS.API.CONSUMER.NAMES.GIFT_ACKS',
    '')->{consumers} || []}, 1, 'one consumer again');

# --- nats-server restarts on the same store
$nc->close;
$nats->stop;
$nats->start;
ok(GiftTest::wait_until(60, sub {
    my @c = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
    @c >= 2;
}), 'the worker reconnected');
$nc = GiftStream::nats_connect($nats->port);
burst(20);
ok(got_upto(60, 60), 'after the restart: 41..60, none missing or twice');

# --- a burst of 10,000: flow control on the way
burst(10000);
ok(got_upto(10060, 120), '10,000 more in one burst: all, in order');

ok(!$c->eof, 'the client was never disconnected');
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
