#!/usr/bin/perl
# A resume longer than the backlog: gift_sse_replay_max 500 with
# gift_sse_max_backlog 16.  A client that reads gets the whole replay, in
# order, and is not cut off (it would otherwise reconnect into the same cut,
# forever).

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftStream;

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url, workers => 1,
    http => 'gift_sse_replay_max 500; gift_sse_max_backlog 16;',
    server => 'location = /gift/events { gift_sse; } '
        . 'location = /gift/ws { gift_websocket; }',
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/
}), 'worker follows GIFT_ACKS');

my $nc = GiftStream::nats_connect($nats->port);
my @seqs = $nc->publish_acks_burst(map { { eventId => "r$_",
    deviceId => 'motor_01', rounds => 1 } } 1 .. 400);
# the worker has them all once a client resuming after the last but one
# gets the last
my $m = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => $seqs[-2] });
is_deeply([map { $_->{id} } $m->take(1, 30)], [$seqs[-1]],
    'the worker has the 400 (a resume after #399 gets #400)');
$m->close;

my $c = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => 0 });
my @got = map { $_->{id} } $c->take(400, 10);
is_deeply(\@got, \@seqs, 'SSE: a 400-ack replay through a 16-frame backlog');
ok(!$c->eof, 'and the stream stays open');

my $w = GiftStream::WS->new(port => $ngx->port,
    path => '/gift/ws?last_event_id=0');
my @m = map { $_->{seq} } $w->take(400, 10);
is_deeply(\@m, \@seqs, 'WebSocket: the same');

my $live = $nc->publish_ack(eventId => 'live', deviceId => 'motor_01',
    rounds => 1)->{seq};
is_deeply([map { $_->{id} } $c->take(1, 5)], [$live], 'then live');

unlike(GiftTest::slurp($ngx->error_log), qr/backlog full/,
    'nobody was cut off');
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
