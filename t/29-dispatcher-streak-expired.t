#!/usr/bin/perl
# Issue 14, point 3: a streak frame that finds no streak state on a DLQ
# replay is dead-lettered "streak_expired", never counted from zero.  Two
# streaks on an offline motor: streak X's frame 4 (nothing turned before)
# and streak Y's frame 5 (frame 2 turned 2 before the motor went offline)
# are dead-lettered after max_attempts.  Then the GIFT_STREAKS state of
# streak X (its "s.<streak id>" key and its frame's "e.<event id>" claim) is
# purged, as the bucket's TTL would do; the motor comes back and
# `giftctl dlq replay --all` replays both: X's frame gets a dead_letter
# GiftAck "streak_expired" and turns nothing; Y's frame (state present, the
# positive control) turns only its increment, 3, not 5.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
my $mq = GiftDispatch::start_mosquitto(dir => $dir);
my $tb = GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port,
    args => [ '--latency-ms', '1' ]);

my $rules = <<'R';
    default_device = "motor_01";
    rule = ( { gift = "Ghost"; device = "motor_07"; } );
R
my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $mq->port, rules => $rules, rpc_timeout_ms => 250,
    extra_nats => 'retry_delays_ms = [ 50 ]; max_attempts = 2;');

my $acks_of = sub {
    my ($id) = @_;
    return grep { $_->{ack}{event_id} eq $id } GiftDispatch::acks($nats->url);
};
my $motor = sub { $tb->totals->{devices}{motor_07} // {} };
my %x = (platform => 'tiktok', userId => 'ux', giftName => 'Ghost',
    diamond => 10, streakId => 'tiktok_ux_streak');
my %y = (platform => 'tiktok', userId => 'uy', giftName => 'Ghost',
    diamond => 10, streakId => 'tiktok_uy_streak');

# streak Y's frame 2 turns 2 x 10 while the motor is online
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(%y,
    quantity => 2, streakCount => 2, eventId => 'sy-2'));
my ($y2);
ok(GiftTest::wait_until(30, sub { ($y2) = $acks_of->('sy-2') }, 0.05),
    'streak Y frame 2 acknowledged');
is($y2->{ack}{status}, 'ok', '... ok');
is($y2->{ack}{rounds}, 20, '... 20 rounds');
is($motor->()->{rounds}, 20, 'the motor turned 20');

# the motor goes offline: X's frame 4 and Y's frame 5 are dead-lettered
$tb->control('offline motor_07');
GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(%x, quantity => 4, streakCount => 4, eventId => 'sx-4'),
    GiftDispatch::gift(%y, quantity => 5, streakCount => 5, eventId => 'sy-5'));
my ($x4, $y5);
ok(GiftTest::wait_until(60, sub {
    ($x4) = $acks_of->('sx-4'); ($y5) = $acks_of->('sy-5'); $x4 && $y5 }, 0.1),
    'both frames for the offline motor got a GiftAck');
is($x4->{ack}{status}, 'dead_letter', 'X frame 4: dead_letter');
is($x4->{ack}{reason}, 'timeout', '... timeout');
is($y5->{ack}{status}, 'dead_letter', 'Y frame 5: dead_letter');
is($y5->{ack}{reason}, 'timeout', '... timeout');
is(scalar(grep { $_->{event}{event_id} =~ /^s[xy]-/ }
    GiftDispatch::dead_letters($nats->url)), 2, 'both in GIFTS_DLQ');

# streak X's state leaves GIFT_STREAKS (as its TTL would make it)
my $c = GiftDispatch::NatsClient->new($nats->url);
for my $k ('s.tiktok_ux_streak', 'e.sx-4') {
    my ($r) = $c->requests('$JS.API.STREAM.PURGE.KV_GIFT_STREAKS',
        qq({"filter":"\$KV.GIFT_STREAKS.$k"}));
    like($r // '', qr/"success":\s*true/, "purged GIFT_STREAKS key $k")
        or diag $r;
}
my ($info) = $c->requests('$JS.API.STREAM.INFO.KV_GIFT_STREAKS',
    '{"subjects_filter":">"}');
$c->close;
like($info, qr/GIFT_STREAKS\.s\.tiktok_uy_streak/,
    "streak Y's state is still there");
unlike($info, qr/GIFT_STREAKS\.(?:s\.tiktok_ux_streak|e\.sx-4)"/,
    "streak X's is gone");

# the motor comes back; both are replayed
$tb->control('online motor_07');
my ($out, $rc) = GiftTest::giftctl($nats->url, 'dlq', 'replay', '--all');
is($rc, 0, 'giftctl dlq replay --all') or diag $out;
like($out, qr/^replayed DLQ #\d+ event sx-4 as GIFTS #\d+$/m, '... X frame 4');
like($out, qr/^replayed DLQ #\d+ event sy-5 as GIFTS #\d+$/m, '... Y frame 5');

my (%r);
ok(GiftTest::wait_until(60, sub {
    for my $id ('sx-4', 'sy-5') {
        ($r{$id}) = grep { $_->{msg_id} =~ /:replay:/ } $acks_of->($id);
    }
    $r{'sx-4'} && $r{'sy-5'};
}, 0.1), 'both replays got their GiftAcks');
is($r{'sx-4'}{ack}{status}, 'dead_letter',
    'X frame 4 without streak state: dead_letter');
is($r{'sx-4'}{ack}{reason}, 'streak_expired', '... reason streak_expired');
is($r{'sy-5'}{ack}{status}, 'ok', 'Y frame 5 with its state: ok');
is($r{'sy-5'}{ack}{rounds}, 30, '... turning its increment 3 x 10, not 5 x 10');
my $m = $motor->();
is($m->{rounds}, 50, 'the motor turned 20 + 30 in all: nothing for X');
is($m->{duplicates} // 0, 0, 'no command repeated an event id');
like($d->log_text, qr/sx-4.*streak_expired|streak_expired.*sx-4/,
    'the log says why');

is($d->stop('TERM'), 0, 'the dispatcher exits 0');
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
