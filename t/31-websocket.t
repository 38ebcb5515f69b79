#!/usr/bin/perl
# Acknowledgements over WebSocket, with raw frames: handshake, messages,
# ping/pong, close, filters and resume by message, bad and oversize frames,
# unmasked frames, a wrong Origin.

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
    http => 'gift_sse_heartbeat 1s; gift_sse_replay_max 50;',
    server => 'location = /gift/ws { gift_websocket; '
        . 'gift_websocket_allow_origin https://overlay.example; } '
        . 'location = /gift/ws-any { gift_websocket; }',
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/
}), 'worker follows GIFT_ACKS');

my $nc = GiftStream::nats_connect($nats->port);
my $n = 0;
sub ack {
    my (%a) = @_;
    $n++;
    return $nc->publish_ack(eventId => "w$n", deviceId => 'motor_01',
        rounds => $n, roomId => 'r1', userName => "V$n", giftName => 'Motor',
        diamond => 1, quantity => $n, platform => 'tiktok', %a)->{seq};
}

my %origin = (Origin => 'https://overlay.example');

# --- handshake
my $ws = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
is($ws->status, 101, '101 Switching Protocols');
is($ws->header('Sec-WebSocket-Accept'), $ws->expected_accept,
    'Sec-WebSocket-Accept is base64(SHA-1(key + GUID))');
like($ws->header('Upgrade'), qr/^websocket$/i, 'Upgrade: websocket');
like($ws->header('Connection'), qr/upgrade/i, 'Connection: upgrade');

# --- messages
my @seqs = map { ack(deviceId => ($_ % 2 ? 'motor_01' : 'motor_02')) } 1 .. 4;
my @m = $ws->take(4, 5);
is_deeply([map { $_->{seq} } @m], \@seqs, 'acknowledgements as text frames');
is($m[0]{eventId}, 'w1', 'acknowledgement JSON');
is($m[0]{rounds}, 1, 'rounds');

# --- ping/pong: the server answers our ping, and pings us
$ws->send_frame(9, 'abc');
my $f = $ws->next_frame(3);
$f = $ws->next_frame(3) while $f && $f->{op} == 9;
ok($f && $f->{op} == 10 && $f->{payload} eq 'abc', 'pong echoes the ping');
ok(!$f->{masked}, 'server frames are unmasked');
ok(GiftTest::wait_until(30, sub { $ws->take(1, 0.2); $ws->pings >= 1 }),
    'server pings on the heartbeat');

# --- filters by message
$ws->send_text('{"device":"motor_02"}');
ok($ws->sync, 'filter message handled (our ping answered after it)');
ack(deviceId => 'motor_01');
my $s2 = ack(deviceId => 'motor_02');
@m = $ws->take(1, 3);
is_deeply([map { $_->{seq} } @m], [$s2], 'device filter set by message');
$ws->send_text('{"device":null,"status":["dead_letter"]}');
ok($ws->sync, 'filter message handled');
ack();
my $dl = ack(status => 'dead_letter', reason => 'timeout');
@m = $ws->take(1, 3);
is_deeply([map { $_->{seq} } @m], [$dl], 'status filter, device cleared');

# --- a bad JSON message gets an error message, the stream goes on
$ws->send_text('not json');
@m = $ws->take(1, 3);
is($m[0]{error}, 'invalid_json', 'invalid JSON answered');

# --- close handshake
$ws->send_frame(8, pack('n', 1000) . 'bye');
is($ws->wait_close(3), 1000, 'close answered with the same code');
$ws->_fill(1) until $ws->eof || !$ws->_fill(1);
ok($ws->eof, 'then the server closes the connection');

# --- resume by message, and by query
my $last = $seqs[-1];
my $r = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$r->send_text(qq({"lastEventId":$last}));
my $total = $n;
@m = $r->take($total - $last, 5);
is_deeply([map { $_->{seq} } @m], [$last + 1 .. $total],
    'resume by message replays the missed ones');
my $live = ack();
@m = $r->take(1, 3);
is_deeply([map { $_->{seq} } @m], [$live], 'then live');
is_deeply([$r->take(1, 0.3)], [], 'no duplicate');
$r->close;

my $q = GiftStream::WS->new(port => $ngx->port, headers => \%origin,
    path => '/gift/ws?last_event_id=' . ($live - 2));
is_deeply([map { $_->{seq} } $q->take(2, 5)], [$live - 1, $live],
    'resume by ?last_event_id=');
$q->close;

# --- bad frames
my $bad = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$bad->send_frame(1, '{"device":"x"}', unmasked => 1);
is($bad->wait_close(3), 1002, 'unmasked client frame: 1002');

$bad = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$bad->send_frame(1, '{}', rsv => 1);
is($bad->wait_close(3), 1002, 'RSV bit set: 1002');

$bad = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$bad->send_frame(0x3, 'x');
is($bad->wait_close(3), 1002, 'unknown opcode: 1002');

$bad = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$bad->send_frame(9, 'x' x 126);
is($bad->wait_close(3), 1002, 'oversize control frame: 1002');

$bad = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$bad->send_text('{"device":"' . ('x' x 5000) . '"}');
is($bad->wait_close(3), 1009, 'oversize message: 1009');

$bad = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$bad->send_frame(2, "\x00\x01");
is($bad->wait_close(3), 1003, 'binary message: 1003');

# fragmented text is reassembled
my $fr = GiftStream::WS->new(port => $ngx->port, headers => \%origin);
$fr->send_frame(1, '{"dev', fin => 0);
$fr->send_frame(0, 'ice":"motor_09"}');
ok($fr->sync, 'fragmented filter message handled');
ack(deviceId => 'motor_01');
my $s9 = ack(deviceId => 'motor_09');
is_deeply([map { $_->{seq} } $fr->take(1, 3)], [$s9],
    'fragmented message reassembled');

# --- origin and handshake checks
my $o = GiftStream::WS->new(port => $ngx->port,
    headers => { Origin => 'https://evil.example' });
is($o->status, 403, 'wrong Origin refused');
$o = GiftStream::WS->new(port => $ngx->port);
is($o->status, 403, 'missing Origin refused where origins are set');
$o = GiftStream::WS->new(port => $ngx->port, path => '/gift/ws-any');
is($o->status, 101, 'no origin list: any origin');
$o->close;
$o = GiftStream::WS->new(port => $ngx->port, path => '/gift/ws-any',
    headers => { 'Sec-WebSocket-Version' => 8 });
is($o->status, 426, 'version 8: 426');
is($o->header('Sec-WebSocket-Version'), '13', 'tells the version');
$o = GiftStream::WS->new(port => $ngx->port, path => '/gift/ws-any',
    headers => { 'Sec-WebSocket-Key' => 'short' });
is($o->status, 400, 'bad key: 400');
$o = GiftStream::WS->new(port => $ngx->port, path => '/gift/ws-any',
    headers => { Upgrade => undef });
is($o->status, 426, 'no Upgrade: 426');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
