#!/usr/bin/perl
# Issue 14, point 1: an offline device is treated like a paused one for a
# bounded time (devices.offline_grace_ms), then its failures count as
# attempts again.  A gift for a motor that never answers: within the
# grace the dispatcher keeps probing it (several commands) without
# spending an attempt; after the grace its attempts count and it is
# dead-lettered after max_attempts, with one GiftAck.  A motor that comes
# back within the grace turns its gift, attempt 1.

use strict;
use warnings;
use Test::More;
use Time::Local qw(timegm);
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
my $st = GiftTB::start_stack(dir => $dir, motors => 'motor_01,motor_off',
    motor_args => [ '--silent', 'motor_off' ], tbsim_args => [ '--offline', 'motor_off' ]);
my $tb = $st->{motors};
my $rules = <<'R';
    default_device = "motor_01";
    rule = (
        { gift = "Ghost"; device = "motor_off"; }
    );
R
my $grace = 4000;
my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $st->{port}, extra_mqtt => $st->conf(1), rules => $rules,
    rpc_timeout_ms => 300,
    extra_nats => 'ack_wait_ms = 10000; retry_delays_ms = [ 100 ]; '
        . 'max_attempts = 2;',
    extra_devices => "offline_grace_ms = $grace; offline_retry_ms = 200;");

# "2026-12-02T14:28:11.213Z ..." -> ms since the epoch
my $log_ms = sub {
    my ($line) = @_;
    my ($y, $mo, $dd, $h, $mi, $s, $ms) =
        $line =~ /^(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)\.(\d+)Z/ or return;
    return timegm($s, $mi, $h, $dd, $mo - 1, $y) * 1000 + $ms;
};
my $ack_of = sub {
    my ($id) = @_;
    return grep { $_->{ack}{event_id} eq $id } GiftDispatch::acks($nats->url);
};

# ------------------------------------------------- silent past the grace
is(GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Ghost', diamond => 3, quantity => 1,
        eventId => 'ghost-1'),
    GiftDispatch::gift(giftName => 'Motor', diamond => 2, quantity => 1,
        eventId => 'real-1')), 2, 'two gifts stored');
my @a;
ok(GiftTest::wait_until(30, sub { @a = $ack_of->('ghost-1'); @a }, 0.1),
    'the silent motor\'s gift is acknowledged in the end') or diag $d->log_text;
is($a[0]{ack}{status}, 'dead_letter', '... dead-lettered');
is($a[0]{ack}{attempts}, 2, '... after max_attempts (2) attempts');
my ($dl) = grep { $_->{event}{event_id} eq 'ghost-1' }
    GiftDispatch::dead_letters($nats->url);
is($dl->{reason}, 'timeout', '... reason timeout');
my ($since_line) = grep { /device motor_off does not answer/ }
    split /\n/, $d->log_text;
ok($since_line, 'the dispatcher said the motor does not answer');
my $waited = $a[0]{ack}{completed_at_ms} - ($log_ms->($since_line // '') // 0);
cmp_ok($waited, '>=', $grace,
    "... and waited out the grace before dead-lettering ($waited ms >= $grace)");
my $cmds = $tb->totals->{devices}{motor_off}{rpcs} // 0;
cmp_ok($cmds, '>', 2,
    "$cmds commands went to the silent motor, 2 of them counted as attempts");
is(($ack_of->('real-1'))[0]{ack}{status}, 'ok', 'the other motor\'s gift: ok');

# ------------------------------------------------- back within the grace
# (past the grace the device stays "not answering", and new gifts spend
# attempts at once, until it answers: first a gift it answers)
$tb->control('online motor_off');
is(GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Ghost', diamond => 5, quantity => 1,
        eventId => 'ghost-back')), 1, 'the motor is back: a gift for it');
ok(GiftTest::wait_until(15, sub { @a = $ack_of->('ghost-back'); @a }, 0.1),
    '... acknowledged');
is($a[0]{ack}{status}, 'ok', '... ok');
like($d->log_text, qr/device motor_off answers again after \d+ ms/,
    'the dispatcher said it answers again');
ok(GiftTest::wait_until(10, sub {
    GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 0
}, 0.1), 'nothing pending');
$cmds = $tb->totals->{devices}{motor_off}{rpcs} // 0;
$st->mute('motor_off');
is(GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Ghost', diamond => 4, quantity => 1,
        eventId => 'ghost-2')), 1, 'a gift for the motor, silent again');
ok(GiftTest::wait_until(10, sub {
    ($tb->totals->{devices}{motor_off}{rpcs} // 0) > $cmds
}, 0.05), '... a command went to it');
sleep 0.8;                     # a few timeouts, well within the grace (4 s)
is(scalar($ack_of->('ghost-2')), 0, '... no outcome within the grace');
$tb->control('online motor_off');
ok(GiftTest::wait_until(15, sub { @a = $ack_of->('ghost-2'); @a }, 0.1),
    'the motor answers again: the gift is acknowledged');
is($a[0]{ack}{status}, 'ok', '... ok');
is($a[0]{ack}{attempts}, 1, '... attempt 1: the wait spent none');
is($tb->totals->{devices}{motor_off}{rounds}, 5 + 4,
    'the motor turned 5 and 4, once each');

is($d->stop('TERM'), 0, 'the dispatcher exits 0 on SIGTERM');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
