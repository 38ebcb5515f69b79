#!/usr/bin/perl
# The ingest path: a gift POSTed to nginx is stored in JetStream and
# answered 202 only after the PubAck.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);
use lib 't/lib';
use GiftTest;

my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

my $ngx = GiftTest::start_nginx(nats_url => $nats->url);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /connected to NATS.*\n(?s:.*)connected to NATS/
}), 'both workers connected to NATS');

# --- one canonical gift
my $g = {
    event => 'gift', platform => 'tiktok', userId => 'user_123',
    userName => 'Alice', giftName => 'Motor', diamond => 10, quantity => 2,
    timestamp => 1700000000000, eventId => 'evt-1', roomId => 'room_9',
    giftId => '5655',
};
my $t0 = int(time * 1000);
my ($st, $body, $res) = GiftTest::post_gift($ngx->port, $g);
my $t1 = int(time * 1000);
is($st, 202, 'gift accepted');
is_deeply($body, { id => 'evt-1', seq => 1, duplicate => JSON::PP::false },
    '202 body names id, seq, duplicate') or diag explain $body;
like($res->{headers}{'content-type'}, qr{^application/json}, 'JSON answer');

my $m = GiftTest::stored($nats->url, 'GIFTS', 1);
ok($m, 'GIFTS #1 exists');
is($m->{subject}, 'gift.events.tiktok', 'subject gift.events.<platform>');
is($m->{headers}{'Nats-Msg-Id'}, 'evt-1', 'Nats-Msg-Id is the event id');
my $e = $m->{event};
is($e->{eventId}, 'evt-1', 'event id');
is($e->{platform}, 'tiktok', 'platform');
is($e->{userId}, 'user_123', 'user id');
is($e->{userName}, 'Alice', 'user name');
is($e->{giftName}, 'Motor', 'gift name');
is($e->{giftId}, '5655', 'gift id');
is($e->{roomId}, 'room_9', 'room id');
is($e->{diamond}, 10, 'diamond');
is($e->{quantity}, 2, 'quantity');
is($e->{occurredAtMs}, 1700000000000, 'sender timestamp');
ok($e->{receivedAtMs} >= $t0 - 1 && $e->{receivedAtMs} <= $t1 + 1,
    "nginx's receive time: between the request and the answer")
    or diag "$t0 <= $e->{receivedAtMs} <= $t1";

# --- the same event id again: deduplicated, same seq
($st, $body) = GiftTest::post_gift($ngx->port, $g);
is($st, 202, 'retry accepted');
is_deeply($body, { id => 'evt-1', seq => 1, duplicate => JSON::PP::true },
    'retry reports duplicate with the first seq');
is(GiftTest::stream_info($nats->url)->{GIFTS}{messages}, 1,
    'one stored message');

# --- 200 gifts over 20 concurrent connections
my @gifts = map { GiftTest::gift(userId => "u$_") } 1 .. 200;
my @r = GiftTest::post_many($ngx->port, 20, @gifts);
is(scalar(grep { $_ && $_->[1] == 202 } @r), 200, 'all 200 got 202');
my %seqs;
for (@r) {
    my ($id, $s, $b) = @$_;
    my $d = eval { $GiftTest::JSON->decode($b) } or next;
    $seqs{$d->{seq}} = $id if $d->{id} eq $id && !$d->{duplicate};
}
is(scalar(keys %seqs), 200, '200 distinct sequences');
is(GiftTest::stream_info($nats->url)->{GIFTS}{messages}, 201,
    'all 200 stored');
my $bad = 0;
for my $s (sort { $a <=> $b } keys %seqs) {
    my $m = GiftTest::stored($nats->url, 'GIFTS', $s);
    $bad++ unless $m && $m->{event}{eventId} eq $seqs{$s};
}
is($bad, 0, 'each 202 seq holds its own gift');

# --- a wrong method, a wrong content type
($st, $body) = GiftTest::post_gift($ngx->url('/gift'), $g,
    'Content-Type' => 'text/plain');
is($st, 415, 'text/plain refused');
is($body->{error}, 'unsupported_media_type', '415 code');
my $get = HTTP::Tiny->new->get($ngx->url('/gift'));
is($get->{status}, 405, 'GET refused');
is($get->{headers}{allow}, 'POST', 'Allow: POST');

# --- nats-server not running: 503 unavailable at once
$nats->stop;
ok(GiftTest::wait_until(5, sub {
    GiftTest::slurp($ngx->error_log) =~ /disconnected from NATS/
}), 'workers saw the disconnect');
# 'unavailable' (not connected), not a publish that timed out
for (1 .. 10) {
    ($st, $body, $res) = GiftTest::post_gift($ngx->port, GiftTest::gift());
    last unless $st == 503;
}
is($st, 503, '503 without NATS');
is($body->{error}, 'unavailable', 'code unavailable');
is($res->{headers}{'retry-after'}, '1', 'Retry-After');

# --- NATS back: webhooks work again without restarting nginx
$nats->start;
ok(GiftTest::wait_until(15, sub {
    my ($s) = GiftTest::post_gift($ngx->port, GiftTest::gift());
    $s == 202;
}, 0.2), 'accepted again after NATS restarts');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg] in the error log');

# --- a server that wants a user and password: the ones in the URL
{
    # an '@' in the password, as written (cnats takes it so too)
    my $auth = GiftTest::start_nats(args => [ '--user', 'gift',
        '--pass', 's3@cr3t' ]);
    (my $good = $auth->url) =~ s{^nats://}{nats://gift:s3\@cr3t@};
    (my $bad = $auth->url) =~ s{^nats://}{nats://gift:wrong@};
    my ($out, $rc) = GiftTest::giftctl($good, 'setup');
    is($rc, 0, 'giftctl setup with a user and password') or diag $out;

    my $ok = GiftTest::start_nginx(nats_url => $good, workers => 1);
    ok(GiftTest::wait_until(10, sub {
        GiftTest::slurp($ok->error_log) =~ /connected to NATS/
    }), 'user and password from the URL: connected');
    my ($st, $body) = GiftTest::post_gift($ok->port,
        GiftTest::gift(eventId => 'evt-auth'));
    is_deeply([$st, $body->{id}], [202, 'evt-auth'], '... and 202');
    is($ok->stop, 0, '... nginx exits cleanly');

    my $no = GiftTest::start_nginx(nats_url => $bad, workers => 1);
    ok(GiftTest::wait_until(10, sub {
        GiftTest::slurp($no->error_log) =~ /Authorization Violation/
    }), 'a wrong password: the server\'s refusal is in the error log');
    ($st, $body) = GiftTest::post_gift($no->port, GiftTest::gift());
    is_deeply([$st, $body->{error}], [503, 'unavailable'],
        '... and webhooks get 503 unavailable');
    unlike(GiftTest::slurp($no->error_log), qr/connected to NATS/,
        '... never "connected"');
    is($no->stop, 0, '... nginx exits cleanly');
    is(GiftTest::stream_info($good)->{GIFTS}{messages}, 1,
        'GIFTS holds the one accepted gift');
}

done_testing();
