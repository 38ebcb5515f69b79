#!/usr/bin/perl
# Issue 14, point 2: motor safety.  A gift above rules.max_rounds is clamped
# (its GiftAck says rounds executed, rounds requested and capped) or, when
# the operator says so, dead-lettered; rounds above the per-command limit go
# as several commands "<event id>#k", none above the limit; the dispatcher
# re-checks diamond and quantity ranges; a rate of 0 is refused by the
# configuration and by ctl ("unlimited" or "stopped"); "stopped" holds gifts.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $BIN = GiftDispatch::bin('gift-dispatcher');
my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
# ThingsBoard: the stand-in and its motors (GIFT_TB=tbsim: tbsim on mosquitto)
my $st = GiftTB::start_stack(dir => $dir, motors => 8);
my $tb = $st->{motors};

my $rules = sub {
    my ($over) = @_;
    return <<"R";
    default_device = "motor_01";
    max_rounds = 2500;
    $over
    rule = (
        { gift = "Motor"; device = "motor_03"; },
        { gift = "Rose";  device = "motor_02"; }
    );
R
};
my %conf = (dir => $dir, nats_url => $nats->url, mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1),
    rules => $rules->(''),
    extra_devices => 'coalesce_max_rounds = 1000; rounds_per_minute = 600000;');
my $d = GiftDispatch::start_dispatcher(%conf);

my $ack = sub {
    my ($id) = @_;
    my @a;
    GiftTest::wait_until(20, sub {
        @a = grep { $_->{ack}{event_id} eq $id } GiftDispatch::acks($nats->url);
    }, 0.1);
    return @a == 1 ? $a[0]{ack} : undef;
};

# --------------------------------------------------------------- clamp, split
GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Motor', diamond => 1000000,
        quantity => 100000, eventId => 'huge-1'),
    GiftDispatch::gift(giftName => 'Rose', diamond => 1, quantity => 3,
        eventId => 'rose-1'));
my $a = $ack->('huge-1');
ok($a, 'the 10^11-round gift has one GiftAck') or diag $d->log_text;
is($a->{status}, 'ok', '... ok');
is($a->{rounds}, 2500, '... rounds executed: clamped to max_rounds 2500');
is($a->{rounds_requested}, 100000000000, '... rounds requested: 10^11');
is($a->{capped}, 1, '... capped');
is($a->{parts}, 3, '... in 3 commands (1000 + 1000 + 500)');
my $t = $tb->totals->{devices}{motor_03};
is($t->{rounds}, 2500, 'motor_03 turned 2500 rounds');
is($t->{events}, 3, '... as 3 events (huge-1#1..#3)');
is($t->{max_cmd_rounds}, 1000, '... no command above coalesce_max_rounds');
is($t->{duplicates}, 0, '... nothing twice');
like($d->log_text, qr/event huge-1: 100000000000 rounds clamped to max_rounds 2500/,
    'the clamp is logged');
$a = $ack->('rose-1');
is($a->{rounds}, 3, 'a small gift: 3 rounds');
ok(!$a->{capped}, '... not capped');

# --------------------------------------------------------------- ranges
GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Rose', diamond => 1, quantity => 200000,
        eventId => 'bad-q'),
    GiftDispatch::gift(giftName => 'Rose', diamond => 2000000, quantity => 1,
        eventId => 'bad-d'));
for my $id ('bad-q', 'bad-d') {
    $a = $ack->($id);
    is($a && $a->{reason}, 'invalid', "$id (published around the webhook): "
        . 'dead-lettered invalid');
}

# --------------------------------------------------------------- dead_letter
GiftTest::spurt($d->conf, GiftDispatch::dispatcher_conf(%conf,
    log_level => 'info', shutdown_timeout_ms => 10000, rpc_timeout_ms => 3000,
    metrics_port => $d->metrics_port, extra_nats => '', extra_mqtt => '',
    rules => $rules->('over_max_rounds = "dead_letter";')));
$d->signal('HUP');
ok(GiftTest::wait_until(10, sub { $d->log_text =~ /reloaded/ }, 0.05),
    'reloaded with over_max_rounds = "dead_letter"');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Motor', diamond => 1000, quantity => 3, eventId => 'big-2'));
$a = $ack->('big-2');
is($a && $a->{status}, 'dead_letter', 'a gift above max_rounds: dead_letter');
is($a && $a->{reason}, 'overflow', '... reason overflow');
is($tb->totals->{devices}{motor_03}{rounds}, 2500, '... nothing turned');

# --------------------------------------------------------------- rate 0
GiftTest::spurt("$dir/zero.conf", "devices = { rounds_per_minute = 0; };\n");
my $out = `'$BIN' -t -c '$dir/zero.conf' 2>&1`;
isnt($? >> 8, 0, 'rounds_per_minute = 0 is refused by -t');
like($out, qr/zero\.conf:1: devices\.rounds_per_minute: expected a number of rounds >= 1, "unlimited" or "stopped"/,
    '... saying what to write instead');
my $rc;
($out, $rc) = $d->ctl('rate', 'motor_02', '0');
is($rc, 2, 'ctl rate motor_02 0 is refused');
like($out, qr/say "unlimited" or "stopped"/, '... saying what to write');

($out, $rc) = $d->ctl('rate', 'motor_02', 'stopped');
is($rc, 0, 'ctl rate motor_02 stopped') or diag $out;
ok(GiftTest::wait_until(10, sub {
    $d->log_text =~ /device motor_02: running, rate stopped/ }, 0.05),
    '... applied');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Rose', diamond => 1, quantity => 5, eventId => 'rose-2'));
ok(GiftTest::wait_until(10, sub {
    ($d->metric('gift_dispatcher_device_queued{device="motor_02"}') // 0) == 1
}, 0.1), 'a gift for the stopped motor waits');
is($tb->totals->{devices}{motor_02}{rounds}, 3, '... nothing turned');
($out, $rc) = $d->ctl('rate', 'motor_02', 'unlimited');
is($rc, 0, 'ctl rate motor_02 unlimited') or diag $out;
$a = $ack->('rose-2');
is($a && $a->{status}, 'ok', '... then it turns');
is($tb->totals->{devices}{motor_02}{rounds}, 8, '... 5 rounds');

is($d->stop('TERM'), 0, 'the dispatcher exits 0');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
