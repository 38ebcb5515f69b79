#!/usr/bin/perl
# Failures and the dead-letter queue, with real processes: a gift for an
# offline motor is retried with growing NakWithDelay delays, and on the
# consumer's last delivery (MaxDeliver 5) goes to GIFTS_DLQ with
# Gift-Dlq-Reason and Gift-Deliveries, with a dead_letter GiftAck; once the
# motor is back, `giftctl dlq replay` turns it exactly once and stores its
# ok GiftAck.  A dead-lettered streak frame replays with the increment it
# claimed, not 0.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
# ThingsBoard: the stand-in and its motors (GIFT_TB=tbsim: tbsim on mosquitto)
my $tbs = GiftTB::start_stack(dir => $dir, motors => 8,
    motor_args => [ '--silent', 'motor_07', '--latency-ms', '1' ],
    tbsim_args => [ '--offline', 'motor_07', '--latency-ms', '1' ]);
my $tb = $tbs->{motors};

my $rules = <<'R';
    default_device = "motor_01";
    rule = ( { gift = "Ghost"; device = "motor_07"; } );
R
# retries after 200, 400, 800, then 1600 ms (the debug log says each)
my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $tbs->{port},
    extra_mqtt => $tbs->conf(1), rules => $rules, rpc_timeout_ms => 250,
    log_level => 'debug',
    extra_nats => 'retry_delays_ms = [ 200, 400, 800, 1600 ];');
my $ngx = GiftTest::start_nginx(dir => "$dir/nginx", nats_url => $nats->url);
GiftTest::wait_until(10, sub {
    () = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
});

my $acks_of = sub {
    my ($id) = @_;
    return grep { $_->{ack}{event_id} eq $id } GiftDispatch::acks($nats->url);
};
my $motor = sub { $tb->totals->{devices}{motor_07} // {} };

# --------------------------------------------------------------- retries, DLQ
my $t0 = time;
my ($st, $b) = GiftTest::post_gift($ngx->port, GiftTest::gift(
    giftName => 'Ghost', diamond => 7, quantity => 3, eventId => 'ghost-1'));
is($st, 202, 'a gift for the offline motor is accepted');
my $dead;
ok(GiftTest::wait_until(20, sub { ($dead) = $acks_of->('ghost-1') }, 0.05),
    'a GiftAck comes after the retries');
my $secs = time - $t0;
my @delays = $d->log_text =~ /event ghost-1 device motor_07: .*; retry \d+ in (\d+) ms/g;
is("@delays", '200 400 800 1600', 'growing back-off: retries after 200, 400, '
    . '800, 1600 ms');
is($dead->{ack}{status}, 'dead_letter', '... status dead_letter');
is($dead->{ack}{reason}, 'timeout', '... reason timeout');
is($dead->{ack}{attempts}, 5, '... after MaxDeliver (5) deliveries');
is($dead->{ack}{rounds}, 21, '... reporting the rounds it would have turned');
is($dead->{msg_id}, 'ghost-1:ack', '... Nats-Msg-Id ghost-1:ack');
# a lower bound: it cannot fail on a slow machine, only if NATS redelivered
# before the delays asked for
cmp_ok($secs, '>=', 3.0, sprintf('... and NATS held each redelivery back: '
    . '%.1f s >= 200+400+800+1600 ms', $secs));
is($motor->()->{ignored}, 5, 'the motor swallowed 5 RPCs, one per delivery');
is($motor->()->{rounds} // 0, 0, '... and turned nothing');

my @dlq = grep { $_->{event}{event_id} eq 'ghost-1' }
    GiftDispatch::dead_letters($nats->url);
is(scalar @dlq, 1, 'one entry in GIFTS_DLQ');
is($dlq[0]{subject}, 'gift.dlq.tiktok', '... on gift.dlq.<platform>');
is($dlq[0]{reason}, 'timeout', '... Gift-Dlq-Reason timeout');
is($dlq[0]{deliveries}, 5, '... Gift-Deliveries 5');
is($dlq[0]{event}{quantity}, 3, '... the original GiftEvent');
ok(GiftTest::wait_until(5, sub {
    GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 0
}, 0.1), 'the delivery was terminated (acked), not left to the server');

my $list = GiftTest::giftctl($nats->url, 'dlq', 'list');
like($list, qr/ghost-1/, 'giftctl dlq list shows it');
like($list, qr/timeout/, '... with its reason');

# --------------------------------------------------------------- a streak frame
# Frame 4 of a streak dead-letters (claimed 4); the motor comes back; frame
# 6 adds 2; the replayed frame 4 then turns its 4, not 0.
my %f = (platform => 'tiktok', userId => 'u9', giftName => 'Ghost',
    diamond => 10, streakId => 'tiktok:u9:1:g');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(%f,
    quantity => 4, streakCount => 4, eventId => 'tt:frame-4'));
my ($f4);
ok(GiftTest::wait_until(20, sub { ($f4) = $acks_of->('tt:frame-4') }, 0.05),
    'streak frame 4 dead-lettered');
is($f4->{ack}{status}, 'dead_letter', '... dead_letter');
is($f4->{ack}{rounds}, 40, '... with the 4 x 10 it claimed');

# --------------------------------------------------------------- replay
$tb->control('online motor_07');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(%f,
    quantity => 6, streakCount => 6, eventId => 'tt:frame-6'));
ok(GiftTest::wait_until(10, sub { ($motor->()->{rounds} // 0) >= 20 }, 0.05),
    'the motor is back: frame 6 adds 2 x 10');

my ($out, $rc) = GiftTest::giftctl($nats->url, 'dlq', 'replay', '--all');
is($rc, 0, 'giftctl dlq replay --all') or diag $out;
like($out, qr/^replayed DLQ #\d+ event ghost-1 as GIFTS #\d+$/m,
    '... replays the gift');
like($out, qr/^replayed DLQ #\d+ event tt:frame-4 as GIFTS #\d+$/m,
    '... and the streak frame');
is(scalar(() = $out =~ /^replayed /mg), 2, '... two replays, nothing else')
    or diag $out;
my @ok;
ok(GiftTest::wait_until(10, sub {
    @ok = grep { $_->{ack}{status} eq 'ok' }
        ($acks_of->('ghost-1'), $acks_of->('tt:frame-4'));
    @ok >= 2;
}, 0.05), 'the replays got their GiftAcks');
my %ok = map { $_->{ack}{event_id} => $_ } @ok;
is($ok{'ghost-1'}{ack}{rounds}, 21, 'ghost-1: ok, 21 rounds');
like($ok{'ghost-1'}{msg_id}, qr/^ghost-1:replay:\d+:ack$/,
    '... stored under the replay\'s id (the dead_letter one is kept)');
is($ok{'tt:frame-4'}{ack}{rounds}, 40, 'the replayed frame: its own 40');
ok(GiftTest::wait_until(10, sub { ($motor->()->{rounds} // 0) >= 81 }, 0.05),
    'the motor turned');
is($motor->()->{rounds}, 21 + 20 + 40, 'motor total: 21 + 20 + 40, exactly');
is($motor->()->{duplicates}, 0, 'nothing twice');
is(scalar(grep { $_->{event}{event_id} =~ /^(ghost-1|tt:frame-4)$/ }
    GiftDispatch::dead_letters($nats->url)), 0, 'the DLQ is empty again');

# a second replay of the same entry: nothing left to replay
($out, $rc) = GiftTest::giftctl($nats->url, 'dlq', 'replay', '--all');
is($rc, 0, 'giftctl dlq replay --all again: exit 0');
is($out, '', '... and nothing replayed') or diag $out;
# a gift stored after it, once done, proves the dispatcher had its chance
my ($st2) = GiftTest::post_gift($ngx->port, GiftTest::gift(
    giftName => 'Ghost', diamond => 1, quantity => 1, eventId => 'ghost-2'));
is($st2, 202, 'a later gift for the same motor');
ok(GiftTest::wait_until(20, sub {
    grep { $_->{ack}{status} eq 'ok' } $acks_of->('ghost-2') }, 0.05),
    '... acknowledged');
is($motor->()->{rounds}, 82, 'replaying again turned nothing (81 + the 1 '
    . 'of the later gift)');
is(scalar(() = $acks_of->('ghost-1')), 2,
    'ghost-1 has its dead_letter and its ok GiftAck, no more');

# --------------------------------------------------------------- undecodable
GiftDispatch::js_publish_gifts($nats->url, { raw => "\x0a\xff\xff\x0f junk" });
my $u;
ok(GiftTest::wait_until(10, sub {
    ($u) = grep { $_->{reason} eq 'undecodable' }
        GiftDispatch::dead_letters($nats->url);
}, 0.05), 'an undecodable payload goes to the DLQ');
is($u->{deliveries}, 1, '... at once (first delivery)');

is($d->stop('TERM', 15), 0, 'SIGTERM: exit 0');
$tbs->stop;
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
$ngx->stop;
done_testing();
