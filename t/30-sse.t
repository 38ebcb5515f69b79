#!/usr/bin/perl
# Acknowledgements over Server-Sent Events: framing, order and ids, filters,
# heartbeats, both workers, resume with Last-Event-ID, the gap event, and a
# reload in the middle of streaming.

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
    nats_url => $nats->url,
    http => 'gift_sse_heartbeat 1s; gift_sse_replay_max 5;',
    server => 'location = /gift/events { gift_sse; '
        . 'gift_sse_allow_origin "https://overlay.example"; '
        . 'add_header X-Worker $pid; }',
);
my $following = sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/g;
    scalar @n;
};
ok(GiftTest::wait_until(10, sub { $following->() >= 2 }),
    'both workers follow GIFT_ACKS');

my $nc = GiftStream::nats_connect($nats->port);
my $n = 0;
sub ack {
    my (%a) = @_;
    $n++;
    my %ack = (eventId => "e$n", deviceId => 'motor_01', rounds => 10 * $n,
        status => 'ok', attempts => 1, platform => 'tiktok',
        roomId => 'room_a', userId => "u$n", userName => "Viewer $n",
        giftName => 'Motor', diamond => 10, quantity => $n, %a);
    my $pa = $nc->publish_ack(%ack);
    die "no seq" unless $pa->{seq};
    return $pa->{seq};
}

# clients until both workers are represented
my (@clients, %by_worker);
for (1 .. 30) {
    my $c = GiftStream::SSE->new(port => $ngx->port);
    push @clients, $c;
    $by_worker{$c->header('X-Worker')}++;
    last if keys %by_worker >= 2 && @clients >= 4;
}
is(scalar(keys %by_worker), 2, 'clients on both workers');

my $c0 = $clients[0];
is($c0->status, 200, 'SSE 200');
like($c0->header('Content-Type'), qr{^text/event-stream}, 'content type');
is($c0->header('Cache-Control'), 'no-cache', 'Cache-Control: no-cache');
is($c0->header('X-Accel-Buffering'), 'no', 'X-Accel-Buffering: no');
is($c0->header('Access-Control-Allow-Origin'), 'https://overlay.example',
    'CORS origin');

my $f_dev = GiftStream::SSE->new(port => $ngx->port,
    path => '/gift/events?device=motor_02');
my $f_two = GiftStream::SSE->new(port => $ngx->port,
    path => '/gift/events?device=motor_02&device=motor_03');
my $f_comma = GiftStream::SSE->new(port => $ngx->port,
    path => '/gift/events?device=motor_02,motor_03&status=dead_letter');
my $f_room = GiftStream::SSE->new(port => $ngx->port,
    path => '/gift/events?room=room_b');

# 10 acknowledgements over three devices
my @seqs;
for my $i (1 .. 10) {
    my $dev = ('motor_01', 'motor_02', 'motor_03')[$i % 3];
    push @seqs, ack(deviceId => $dev,
        status => ($i % 4 == 0 ? 'dead_letter' : 'ok'),
        reason => ($i % 4 == 0 ? 'timeout' : undef),
        roomId => ($i % 2 ? 'room_a' : 'room_b'));
}
is_deeply(\@seqs, [1 .. 10], 'acks stored as GIFT_ACKS #1..10');

my $all_ok = 1;
for my $c (@clients) {
    my @ev = $c->take(10, 10);
    my @ids = map { $_->{id} } @ev;
    next if "@ids" eq "@seqs" && !grep { $_->{event} ne 'ack' } @ev;
    $all_ok = 0;
    diag('worker ' . $c->header('X-Worker') . " got: @ids");
}
ok($all_ok, 'every client on both workers got ids 1..10, in order, as '
    . "'ack' events");

# the first client's view, field by field
my $c1 = GiftStream::SSE->new(port => $ngx->port);
my $s11 = ack(deviceId => 'motor_01', rounds => 70,
    userName => "Zo\x{eb} \"Z\"",
    receivedAtMs => 1700000000000, completedAtMs => 1700000000012);
my ($e) = $c1->take(1, 5);
is($e->{id}, $s11, 'id is the GIFT_ACKS sequence');
is_deeply($e->{json}, {
    seq => $s11, eventId => 'e11', deviceId => 'motor_01', rounds => 70,
    status => 'ok', attempts => 1, platform => 'tiktok', roomId => 'room_a',
    userId => 'u11', userName => "Zo\x{eb} \"Z\"", giftName => 'Motor',
    diamond => 10, quantity => 11, latencyMs => 12, ts => 1700000000012,
}, 'data is the acknowledgement JSON') or diag explain $e;
like(join("\n", $c1->comment_lines), qr/^: gift acknowledgements/,
    'opening comment');
is($c1->retry, 2000, 'retry: hint');
$c1->close;

# motor_02: #1,4,7,10; motor_03: #2,5,8; dead letters: #4, #8
my @d = map { $_->{json}{deviceId} } $f_dev->take(4, 5);
is_deeply(\@d, [('motor_02') x 4], '?device= filter');
@d = map { $_->{json}{deviceId} } $f_two->take(7, 5);
is(scalar(@d), 7, 'two ?device= values');
ok(!grep({ $_ eq 'motor_01' } @d), 'no other device');
my @dl = $f_comma->take(2, 5);
ok(@dl && !grep({ $_->{json}{status} ne 'dead_letter'
    || $_->{json}{deviceId} eq 'motor_01' } @dl),
    'comma list plus ?status= filter');
is_deeply([map { $_->{id} } @dl], [4, 8],
    'only dead letters of motor_02/03')
    or diag explain \@dl;
my @rooms = $f_room->take(5, 5);
ok(@rooms == 5 && !grep({ $_->{json}{roomId} ne 'room_b' } @rooms),
    '?room= filter');

# heartbeats
my $hb = $c0->comments;
$c0->drain(2.5);
cmp_ok($c0->comments - $hb, '>=', 2, 'heartbeat comments every second');

# resume: disconnect, miss three, reconnect with Last-Event-ID
$clients[1]->close;
my $last = $s11;
my @missed = map { ack() } 1 .. 3;
my $r = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => $last });
my @got = map { $_->{id} } $r->take(3, 5);
is_deeply(\@got, \@missed, 'resume replays exactly the missed ones');
my $live = ack();
@got = map { $_->{id} } $r->take(1, 5);
is_deeply(\@got, [$live], 'then live, no gap or duplicate at the seam');
is_deeply([map { $_->{id} } $r->drain(0.3)], [], 'nothing more');

# ?last_event_id= works too
my $q = GiftStream::SSE->new(port => $ngx->port,
    path => '/gift/events?last_event_id=' . ($live - 2));
is_deeply([map { $_->{id} } $q->take(2, 5)], [$live - 1, $live],
    '?last_event_id=');

# more missed than gift_sse_replay_max (5): a gap event, then the newest 5
my $g = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => 2 });
my @ev = $g->take(6, 5);
is($ev[0]{event}, 'gap', 'gap event first');
is_deeply($ev[0]{json}, { from => 3, to => $live - 5 }, 'gap names the range');
is_deeply([map { $_->{id} } @ev[1 .. 5]], [$live - 4 .. $live],
    'then the newest replay_max acknowledgements');

# a bad Last-Event-ID
my $bad = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => 'abc' });
is($bad->status, 400, 'non-numeric Last-Event-ID refused');

# reload while streaming: streams end, clients resume on the new workers
my $w = GiftStream::SSE->new(port => $ngx->port);
my $before = ack();
my ($wev) = $w->take(1, 5);
is($wev->{id}, $before, 'streaming before reload');
$ngx->reload;
$w->drain(3);
ok($w->eof, 'reload ended the stream');
ok(GiftTest::wait_until(10, sub { $following->() >= 4 }),
    'new workers follow GIFT_ACKS');
my @after = map { ack() } 1 .. 2;
my $w2 = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => $before });
is_deeply([map { $_->{id} } $w2->take(2, 5)], \@after,
    'resumed after reload without loss');

$_->close for @clients[2 .. $#clients], $w2, $g, $q, $r;
is($ngx->stop, 0, 'nginx exits cleanly with streams open');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
