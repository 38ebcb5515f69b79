#!/usr/bin/perl
# Issue 14, point 4: one slow device never stalls the others.  motor_01 does
# not answer while 3,000 gifts wait for it; it holds at most its share of
# nats.max_inflight (devices.max_held), the rest of its backlog is released
# back to the stream for later, and motor_02's gifts, stored after that
# backlog, keep completing.  When motor_01 is back its backlog turns, each
# gift once.  The same for a paused motor_03.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
# ThingsBoard: the stand-in and its motors (GIFT_TB=tbsim: tbsim on mosquitto)
my $st = GiftTB::start_stack(dir => $dir, motors => 8,
    motor_args => [ '--silent', 'motor_01' ], tbsim_args => [ '--offline', 'motor_01' ]);
my $tb = $st->{motors};

my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1), rpc_timeout_ms => 1000,
    extra_nats => 'max_inflight = 200;',
    extra_devices => 'max_held = 50; busy_retry_ms = 1000; '
        . 'offline_grace_ms = 600000; offline_retry_ms = 300;');

my $N1 = 3000;
is(GiftDispatch::js_publish_gifts($nats->url, map {
    GiftDispatch::gift(giftName => 'Lollipop', diamond => 1, quantity => 1,
        eventId => "m1-$_") } 1 .. $N1), $N1, "$N1 gifts for silent motor_01");
ok(GiftTest::wait_until(30, sub {
    $d->log_text =~ /device motor_01 does not answer/ }, 0.1),
    'motor_01 is waited for');

my $acked = sub {
    my ($re) = @_;
    return scalar grep { $_->{ack}{event_id} =~ $re }
        GiftDispatch::acks($nats->url);
};
my $N2 = 0;
for my $batch (1 .. 3) {
    is(GiftDispatch::js_publish_gifts($nats->url, map {
        GiftDispatch::gift(giftName => 'Rose', diamond => 1, quantity => 2,
            eventId => "m2-$batch-$_") } 1 .. 100), 100,
        "batch $batch: 100 gifts for motor_02, behind motor_01's backlog");
    $N2 += 100;
    ok(GiftTest::wait_until(60, sub { $acked->(qr/^m2-/) >= $N2 }, 0.2),
        "... all acknowledged while motor_01 is silent")
        or diag 'acked ' . $acked->(qr/^m2-/);
    my $h = ($d->metric('gift_dispatcher_device_queued{device="motor_01"}') // 0)
        + ($d->metric('gift_dispatcher_device_inflight{device="motor_01"}') // 0);
    cmp_ok($h, '<=', 50, "... motor_01 holds $h <= its share of 50");
}
is($acked->(qr/^m1-/), 0, 'motor_01 turned nothing meanwhile');
is($tb->totals->{devices}{motor_02}{rounds}, 2 * $N2, "motor_02 turned 2 x $N2");
cmp_ok($d->metric('gift_dispatcher_gifts_busy_released_total') // 0, '>', 0,
    'motor_01\'s surplus was released for later');

$tb->control('online motor_01');
ok(GiftTest::wait_until(180, sub { $acked->(qr/^m1-/) >= $N1 }, 0.5),
    "motor_01 back: its $N1 gifts are acknowledged")
    or diag 'acked ' . $acked->(qr/^m1-/);
my $t = $tb->totals->{devices};
is($t->{motor_01}{rounds}, $N1, "motor_01 turned $N1 rounds");
# a reply late past rpc_timeout_ms (a loaded machine) makes a command go
# again; the motors' event-id window absorbs it: at most one command's
# gifts (64), and never a round twice (above)
cmp_ok($t->{motor_01}{duplicates} + $t->{motor_02}{duplicates}, '<=', 64,
    'commands repeated for executed ids within one command');

# A paused device holds no more than its share either.
my ($out, $rc) = $d->ctl('pause', 'motor_03');
is($rc, 0, 'ctl pause motor_03') or diag $out;
my $N3 = 1000;
is(GiftDispatch::js_publish_gifts($nats->url, map {
    GiftDispatch::gift(giftName => 'Motor', diamond => 1, quantity => 1,
        eventId => "m3-$_") } 1 .. $N3), $N3, "$N3 gifts for paused motor_03");
ok(GiftTest::wait_until(30, sub {
    ($d->metric('gift_dispatcher_device_queued{device="motor_03"}') // 0) > 0
}, 0.1), '... it holds some');
is(GiftDispatch::js_publish_gifts($nats->url, map {
    GiftDispatch::gift(giftName => 'Rose', diamond => 1, quantity => 2,
        eventId => "m2-p-$_") } 1 .. 100), 100,
    '100 gifts for motor_02, behind motor_03\'s backlog');
$N2 += 100;
ok(GiftTest::wait_until(60, sub { $acked->(qr/^m2-/) >= $N2 }, 0.2),
    '... all acknowledged while motor_03 is paused')
    or diag 'acked ' . $acked->(qr/^m2-/);
my $h3 = ($d->metric('gift_dispatcher_device_queued{device="motor_03"}') // 0)
    + ($d->metric('gift_dispatcher_device_inflight{device="motor_03"}') // 0);
cmp_ok($h3, '<=', 50, "... motor_03 holds $h3 <= its share of 50");
is($acked->(qr/^m3-/), 0, 'motor_03 turned nothing meanwhile');
($out, $rc) = $d->ctl('resume', 'motor_03');
is($rc, 0, 'ctl resume motor_03') or diag $out;
ok(GiftTest::wait_until(120, sub { $acked->(qr/^m3-/) >= $N3 }, 0.5),
    "motor_03 resumed: its $N3 gifts are acknowledged")
    or diag 'acked ' . $acked->(qr/^m3-/);
is($tb->totals->{devices}{motor_03}{rounds}, $N3, "motor_03 turned $N3 rounds");
is($tb->totals->{devices}{motor_02}{rounds}, 2 * $N2, "motor_02 turned 2 x $N2");

is(scalar(GiftDispatch::dead_letters($nats->url)), 0, 'no dead letters');
is(scalar(() = GiftDispatch::acks($nats->url)), $N1 + $N2 + $N3,
    'one GiftAck per gift');

is($d->stop('TERM'), 0, 'the dispatcher exits 0');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
