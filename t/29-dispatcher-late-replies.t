#!/usr/bin/perl
# Issue 14, point 6: a reply only completes its own command.  RPC ids wrap
# (20 bits: about a minute at 15k RPCs/s; here, with a test failpoint,
# after 64 ids) and a reply can come after its RPC timed out.  Six fast
# motors make the ids wrap within a fraction of a second; motor_a answers
# every command 1200 ms late, past the 400 ms timeout; motor_b never
# answers.  An id that timed out is kept from new RPCs for
# mqtt.late_reply_ms, so no late reply of motor_a completes a command to
# motor_b: every motor_b gift is dead-lettered, none acknowledged ok, and
# when every id is in flight or quarantined, a device waits rather than
# reuse one.  Caveat: a wrong completion needs a late reply to meet a
# reused id that motor_b holds, about 1 in 64 while the fast motors turn;
# a control run with T_LATE_REPLY_MS=0 (no quarantine) does not reliably
# produce one, so this guards the mechanism more than it proves the fix.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $late_reply_ms = $ENV{T_LATE_REPLY_MS} // 2000;   # 0: the control run
my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
# ThingsBoard: the stand-in and its motors (GIFT_TB=tbsim: tbsim on
# mosquitto); the stand-in passes a motor's late reply on (its RPC node
# waits 3 s)
my $st = GiftTB::start_stack(dir => $dir,
    motors => join(',', 'motor_a', 'motor_b', map { "motor_f$_" } 1 .. 6),
    motor_args => [ '--silent', 'motor_b' ], tbsim_args => [ '--offline', 'motor_b' ]);
my $tb = $st->{motors};
$tb->control('slow motor_a=1200');

my $rules = "    rule = (\n        { gift = \"Ghost\"; device = \"motor_b\"; },\n"
    . "        { gift = \"Late\"; device = \"motor_a\"; }"
    . join('', map { ",\n        { gift = \"F$_\"; device = \"motor_f$_\"; }" } 1 .. 6)
    . "\n    );\n";
my $d;
{
    local $ENV{GIFT_DISPATCHER_FAILPOINT} = 'rpc_counter_bits=6';
    $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
        mqtt_port => $st->{port}, rules => $rules, rpc_timeout_ms => 400,
        extra_nats => 'retry_delays_ms = [ 20 ]; max_attempts = 6;',
        extra_mqtt => $st->conf(1) . " late_reply_ms = $late_reply_ms;",
        extra_devices => 'coalesce_max_events = 1; offline_retry_ms = 10;');
}

my $N = 15;
my $F = 3000;
is(GiftDispatch::js_publish_gifts($nats->url,
    (map { GiftDispatch::gift(giftName => 'Late', eventId => "a-$_") } 1 .. $N),
    (map { GiftDispatch::gift(giftName => 'Ghost', eventId => "b-$_") } 1 .. $N),
    (map { GiftDispatch::gift(giftName => 'F' . (1 + $_ % 6),
        eventId => "f-$_") } 1 .. $F)),
    2 * $N + $F, "$N gifts for late motor_a, $N for silent motor_b, $F for "
    . 'six fast motors');
ok(GiftTest::wait_until(20, sub {
    $d->log_text =~ /failpoint: RPC ids wrap after 6 bits/ }, 0.1),
    'RPC ids wrap after 64 (failpoint)');

# motor_a's and motor_b's gifts all end (as dead letters: nothing answers
# in time); the fast motors' gifts are acknowledged ok
ok(GiftTest::wait_until(180, sub {
    ($d->metric('gift_dispatcher_gifts_acked_total{status="dead_letter"}')
        // 0) + ($d->metric('gift_dispatcher_gifts_acked_total{status="ok"}')
        // 0) >= 2 * $N + $F
}, 0.5), 'every gift is acknowledged');
my @b = grep { $_->{ack}{event_id} =~ /^b-/ } GiftDispatch::acks($nats->url);
is(scalar @b, $N, "one GiftAck per motor_b gift");
is(scalar(grep { $_->{ack}{status} eq 'ok' } @b), 0,
    'none of them ok: no late reply completed a command to motor_b');
is(scalar(grep { $_->{ack}{status} eq 'dead_letter'
    && $_->{ack}{reason} eq 'timeout' } @b), $N,
    '... all dead-lettered timeout');
cmp_ok($d->metric('gift_dispatcher_replies_unknown_total') // 0, '>', 20,
    'late replies came (and were ignored as not ours)');
my $rpcs = $d->metric('gift_dispatcher_rpcs_total{outcome="sent"}') // 0;
cmp_ok($rpcs, '>', 10 * 64, "$rpcs RPCs: the 64 ids wrapped many times");

is($d->stop('TERM'), 0, 'the dispatcher exits 0');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
