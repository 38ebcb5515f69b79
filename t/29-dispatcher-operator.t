#!/usr/bin/perl
# Issue 14, points 3, 5, 7, 8, with real processes:
# - `ctl resume DEVICE --drop-backlog`: a paused motor's backlog is
#   dead-lettered "dropped" instead of turning (plain resume turns it);
# - a user's second streak of the same gift without groupId counts;
# - a retried gift goes to the device of its first attempt, across a SIGHUP
#   that routes its gift elsewhere;
# - `ctl stop DEVICE` / `ctl stop-all` pause and send the "stop" method.

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
my $st = GiftTB::start_stack(dir => $dir,
    motors => 'motor_01,motor_02,motor_03,motor_s,motor_x,motor_y',
    motor_args => [ '--silent', 'motor_x' ], tbsim_args => [ '--offline', 'motor_x' ]);
my $tb = $st->{motors};

my $rules = sub {
    my ($lion) = @_;
    return <<"R";
    default_device = "motor_01";
    rule = (
        { gift = "Rose";  device = "motor_02"; },
        { gift = "Motor"; device = "motor_03"; },
        { gift = "Heart"; device = "motor_s"; },
        { gift = "Lion";  device = "$lion"; }
    );
R
};
my %conf = (dir => $dir, nats_url => $nats->url, mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1),
    rules => $rules->('motor_x'), rpc_timeout_ms => 300,
    extra_nats => 'retry_delays_ms = [ 1500 ]; max_attempts = 20;');
my $d = GiftDispatch::start_dispatcher(%conf);

my $acks = sub {
    my ($re) = @_;
    return grep { $_->{ack}{event_id} =~ $re } GiftDispatch::acks($nats->url);
};
my $wait_acks = sub {
    my ($re, $n) = @_;
    my @a;
    GiftTest::wait_until(30, sub { (@a = $acks->($re)) >= $n }, 0.1);
    return @a;
};
my $dev = sub { $tb->totals->{devices}{$_[0]} // {} };

# --------------------------------------------------------------- first device
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Lion', diamond => 3, quantity => 1, eventId => 'first-1'));
ok(GiftTest::wait_until(20, sub {
    ($d->metric('gift_dispatcher_gifts_retried_total') // 0) >= 1 }, 0.05),
    'a gift for silent motor_x failed its first attempt');
GiftTest::spurt($d->conf, GiftDispatch::dispatcher_conf(%conf,
    log_level => 'info', shutdown_timeout_ms => 10000,
    metrics_port => $d->metrics_port, extra_mqtt => $st->conf(1),
    extra_devices => '',
    rules => $rules->('motor_y')));
$d->signal('HUP');
ok(GiftTest::wait_until(10, sub { $d->log_text =~ /reloaded/ }, 0.05),
    'SIGHUP: Lion now goes to motor_y');
$tb->control('online motor_x');
my ($a) = $wait_acks->(qr/^first-1$/, 1);
is($a && $a->{ack}{status}, 'ok', 'the retried gift is acknowledged ok');
is($a && $a->{ack}{device_id}, 'motor_x', '... on motor_x, its first device');
cmp_ok($a && $a->{ack}{attempts}, '>=', 2, '... after a failed attempt');
is($dev->('motor_x')->{rounds}, 3, 'motor_x turned it');
is($dev->('motor_y')->{rounds} // 0, 0, 'motor_y did not');
like($d->log_text, qr/event first-1: retried on motor_x, its first device \(the rules now say motor_y\)/,
    'the dispatcher says so');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Lion', diamond => 1, quantity => 1, eventId => 'new-lion'));
($a) = $wait_acks->(qr/^new-lion$/, 1);
is($a && $a->{ack}{device_id}, 'motor_y', 'a new Lion goes to motor_y');

# --------------------------------------------------------------- streaks
# TikTok without groupId: the streak id repeats for the user's next streak;
# its end frame repeats the last count
my %s = (giftName => 'Heart', diamond => 1, userId => 'u1',
    streakId => 'tiktok:u1:7934:0');
GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(%s, quantity => 1, streakCount => 1, eventId => 'a1'),
    GiftDispatch::gift(%s, quantity => 2, streakCount => 2, eventId => 'a2'),
    GiftDispatch::gift(%s, quantity => 2, streakCount => 2, streakEnd => 1,
        eventId => 'a3'));
$wait_acks->(qr/^a\d$/, 3);
is($dev->('motor_s')->{rounds}, 2, 'streak 1 (1, 2, 2 end): 2 rounds');
GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(%s, quantity => 1, streakCount => 1, eventId => 'b1'),
    GiftDispatch::gift(%s, quantity => 3, streakCount => 3, eventId => 'b2'),
    GiftDispatch::gift(%s, quantity => 3, streakCount => 3, streakEnd => 1,
        eventId => 'b3'));
$wait_acks->(qr/^b\d$/, 3);
is($dev->('motor_s')->{rounds}, 5,
    'the same user\'s next streak of the gift (1, 3, 3 end) adds its 3');
# and once more without an end frame: a lower count starts the next one
GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(%s, quantity => 2, streakCount => 2, eventId => 'c1'));
$wait_acks->(qr/^c1$/, 1);
GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(%s, quantity => 1, streakCount => 1, eventId => 'd1'));
$wait_acks->(qr/^d1$/, 1);
is($dev->('motor_s')->{rounds}, 8, '... 2 more, then a lower count: 1 more');
is($dev->('motor_s')->{duplicates}, 0, 'no event id twice');

# --------------------------------------------------------------- drop backlog
my ($out, $rc) = $d->ctl('pause', 'motor_03');
is($rc, 0, 'ctl pause motor_03');
like($out, qr/--drop-backlog/, '... telling how to resume');
ok(GiftTest::wait_until(10, sub { $d->log_text =~ /device motor_03: paused/ },
    0.05), '... applied');
GiftDispatch::js_publish_gifts($nats->url, map {
    GiftDispatch::gift(giftName => 'Motor', diamond => 1, quantity => 2,
        eventId => "held-$_") } 1 .. 3);
ok(GiftTest::wait_until(20, sub {
    ($d->metric('gift_dispatcher_device_queued{device="motor_03"}') // 0) == 3
}, 0.1), 'three gifts wait for paused motor_03');
($out, $rc) = $d->ctl('resume', 'motor_03', '--drop-backlog');
is($rc, 0, 'ctl resume motor_03 --drop-backlog') or diag $out;
my @h = $wait_acks->(qr/^held-/, 3);
is(scalar(grep { $_->{ack}{status} eq 'dead_letter'
    && $_->{ack}{reason} eq 'dropped' } @h), 3,
    'the backlog is dead-lettered "dropped"');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Motor', diamond => 1, quantity => 4, eventId => 'after-1'));
($a) = $wait_acks->(qr/^after-1$/, 1);
is($a && $a->{ack}{status}, 'ok', 'a gift after the resume turns');
is($dev->('motor_03')->{rounds}, 4, 'motor_03 turned only that one');

# --------------------------------------------------------------- stop
($out, $rc) = $d->ctl('stop', 'motor_02');
is($rc, 0, 'ctl stop motor_02') or diag $out;
ok(GiftTest::wait_until(10, sub { ($dev->('motor_02')->{stops} // 0) == 1 },
    0.1), 'motor_02 got the "stop" method');
ok(GiftTest::wait_until(10, sub { $d->log_text =~ /device motor_02: paused/ },
    0.05), '... and is paused');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Rose', diamond => 1, quantity => 1, eventId => 'rose-s'));
ok(GiftTest::wait_until(20, sub {
    ($d->metric('gift_dispatcher_device_queued{device="motor_02"}') // 0) == 1
}, 0.1), '... its gifts wait');
($out, $rc) = $d->ctl('stop-all');
is($rc, 0, 'ctl stop-all') or diag $out;
ok(GiftTest::wait_until(10, sub {
    my $t = $tb->totals->{devices};
    ($t->{motor_01}{stops} // 0) >= 1 && ($t->{motor_03}{stops} // 0) >= 1
        && ($t->{motor_s}{stops} // 0) >= 1;
}, 0.1), 'every device of the rules got "stop"');
($out, $rc) = $d->ctl('resume', 'motor_02');
is($rc, 0, 'ctl resume motor_02');
($a) = $wait_acks->(qr/^rose-s$/, 1);
is($a && $a->{ack}{status}, 'ok', '... its gift turns');

is($d->stop('TERM'), 0, 'the dispatcher exits 0');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
