#!/usr/bin/perl
# Issue 14, point 2: rounds above the per-command limit are split into
# parts, paced by the per-minute limit.  With coalesce_max_rounds = 10 and
# rounds_per_minute = 20, a gift of 30 rounds goes out as two commands of
# 10 at once; the third part waits for the sliding minute to free (the
# rate-wait metric counts it, no GiftAck yet while the motor has turned 20),
# then completes: GiftAck ok, rounds 30, parts 3, no command above 10.

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
my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $mq->port,
    extra_devices => 'coalesce_max_rounds = 10; rounds_per_minute = 20;');

my $acks_of = sub {
    my ($id) = @_;
    return grep { $_->{ack}{event_id} eq $id } GiftDispatch::acks($nats->url);
};
my $motor = sub { $tb->totals->{devices}{motor_03} // {} };

my $waits0 = $d->metric('gift_dispatcher_rate_waits_total') // 0;
is(GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Motor', diamond => 30, quantity => 1, eventId => 'split-30')),
    1, 'a gift of 30 rounds for motor_03');

# the minute's 20 rounds go out at once, as two commands of 10
ok(GiftTest::wait_until(30, sub { ($motor->()->{rounds} // 0) >= 20 }, 0.1),
    'the motor turned the first 20 rounds');
ok(GiftTest::wait_until(30, sub {
    ($d->metric('gift_dispatcher_rate_waits_total') // 0) > $waits0 }, 0.1),
    'the third part waits for the rate limit (rate_waits_total grew)');
my $m = $motor->();
is($m->{rounds}, 20, '... while the motor has turned 20 rounds');
is($m->{rpcs}, 2, '... in 2 commands');
is($m->{max_cmd_rounds}, 10, '... of at most 10 rounds');
is(scalar($acks_of->('split-30')), 0, '... and the gift has no GiftAck yet');

# the sliding minute frees: the third part goes, the gift completes
my ($a);
ok(GiftTest::wait_until(120, sub { ($a) = $acks_of->('split-30') }, 0.5),
    'the gift completes once the minute frees');
is($a->{ack}{status}, 'ok', '... GiftAck ok');
is($a->{ack}{rounds}, 30, '... rounds 30');
is($a->{ack}{parts}, 3, '... in 3 parts');
is(scalar($acks_of->('split-30')), 1, '... one GiftAck');
$m = $motor->();
is($m->{rounds}, 30, 'the motor turned 30 in all');
is($m->{rpcs}, 3, '... in 3 commands');
is($m->{max_cmd_rounds}, 10, '... none above 10 rounds');
is($m->{duplicates} // 0, 0, '... none repeated');

is($d->stop('TERM'), 0, 'the dispatcher exits 0');
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
