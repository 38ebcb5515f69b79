#!/usr/bin/perl
# Issue 14, point 1: every accepted gift ends in exactly one GiftAck, whatever
# happens to dispatchers.  A gift for a paused motor and one for a motor that
# does not answer are held while the dispatcher is stopped (SIGTERM) seven
# times and killed (SIGKILL) seven times: more deliveries than any MaxDeliver
# of old (5) and than max_attempts (3) here.  Releases and crashes spend no
# attempt, the consumer redelivers without limit (MaxDeliver -1), and a silent
# device is waited for like a paused one (offline_grace_ms).  Once the motors
# are back, each gift turns once and has exactly one GiftAck, status ok,
# attempt 1; nothing is dead-lettered.

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
my $st = GiftTB::start_stack(dir => $dir, motors => 'motor_01,motor_02,motor_03,motor_off',
    motor_args => [ '--silent', 'motor_off' ], tbsim_args => [ '--offline', 'motor_off' ]);
my $tb = $st->{motors};

my $rules = <<'R';
    default_device = "motor_01";
    rule = (
        { gift = "Motor"; device = "motor_03"; },
        { gift = "Ghost"; device = "motor_off"; }
    );
R
# ack wait 2 s: a killed dispatcher's gifts come back within seconds
my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1), rules => $rules, rpc_timeout_ms => 300,
    shutdown_timeout_ms => 2000,
    extra_nats => 'ack_wait_ms = 2000; retry_delays_ms = [ 100 ]; '
        . 'max_attempts = 3;',
    extra_devices => 'offline_grace_ms = 600000; offline_retry_ms = 300;');

my $ci = GiftDispatch::consumer_state($nats->url);
is($ci->{config}{max_deliver}, -1,
    'the consumer it created redelivers without limit (MaxDeliver -1)');

my ($out, $rc);
$d->pause_ok('motor_03', '... the dispatcher paused it');

is(GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Motor', diamond => 2, quantity => 3,
        eventId => 'paused-1'),
    GiftDispatch::gift(giftName => 'Ghost', diamond => 5, quantity => 1,
        eventId => 'offline-1')), 2, 'two gifts stored');

# both held: motor_03's queued, motor_off's queued or probing
my $held = sub {
    GiftTest::wait_until(40, sub {
        my $q3 = $d->metric('gift_dispatcher_device_queued{device="motor_03"}')
            // 0;
        my $qo = ($d->metric('gift_dispatcher_device_queued{device="motor_off"}')
            // 0) + ($d->metric(
                'gift_dispatcher_device_inflight{device="motor_off"}') // 0);
        $q3 == 1 && $qo == 1;
    }, 0.1);
};
ok($held->(), 'both gifts are held (paused motor, silent motor)');
ok(GiftTest::wait_until(10, sub {
    $d->log_text =~ /device motor_off does not answer/ }, 0.05),
    '... the silent motor is waited for');

for my $sig (('TERM') x 7, ('KILL') x 7) {
    $d->stop($sig, 20);
    $d->start;
    $held->() or last;
}
ok($held->(), 'after 7 stops and 7 kills both gifts are held again');
# each gift was delivered once, then again after each of 14 stops and kills
my $dels = GiftDispatch::consumer_state($nats->url)->{delivered}{consumer_seq};
cmp_ok($dels, '>=', 2 * 15,
    "$dels deliveries of the 2 gifts: far beyond any old MaxDeliver (5)");

is(scalar(grep { $_->{ack}{event_id} =~ /^(paused-1|offline-1)$/ }
    GiftDispatch::acks($nats->url)), 0, 'no GiftAck yet');
is(scalar(GiftDispatch::dead_letters($nats->url)), 0, 'nothing dead-lettered');

($out, $rc) = $d->ctl('resume', 'motor_03');
is($rc, 0, 'ctl resume motor_03') or diag $out;
$tb->control('online motor_off');

my @a;
ok(GiftTest::wait_until(30, sub {
    @a = grep { $_->{ack}{event_id} =~ /^(paused-1|offline-1)$/ }
        GiftDispatch::acks($nats->url);
    @a >= 2;
}, 0.1), 'both gifts are acknowledged') or diag $d->log_text;
sleep 0.5;                       # a duplicate would land within this
@a = grep { $_->{ack}{event_id} =~ /^(paused-1|offline-1)$/ }
    GiftDispatch::acks($nats->url);
my %by = map { $_->{ack}{event_id} => $_ } @a;
is(scalar @a, 2, 'exactly one GiftAck each');
for my $id ('paused-1', 'offline-1') {
    is($by{$id}{ack}{status}, 'ok', "$id: status ok");
    is($by{$id}{ack}{attempts}, 1, "$id: attempt 1 (restarts and silence spent none)");
}
my $t = $tb->totals->{devices};
is($t->{motor_03}{rounds}, 6, 'motor_03 turned 2 x 3, once');
is($t->{motor_off}{rounds}, 5, 'motor_off turned 5, once');
is(($t->{motor_03}{duplicates} // 0) + ($t->{motor_off}{duplicates} // 0), 0,
    'tbsim saw no event id twice');
is(scalar(GiftDispatch::dead_letters($nats->url)), 0, 'nothing dead-lettered');
ok(GiftTest::wait_until(10, sub {
    GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 0
}, 0.1), 'nothing left pending on the consumer');

is($d->stop('TERM'), 0, 'the dispatcher exits 0 on SIGTERM');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
