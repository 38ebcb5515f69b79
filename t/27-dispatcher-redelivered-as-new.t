#!/usr/bin/perl
# A redelivery that nats-server 2.9 presents as a first delivery.  When a
# redelivery finds no live pull request to go to (here: a gift released
# by a dispatcher that stops, whose own request has just lost interest),
# nats-server 2.9 steps its "next new message" back instead of queueing
# the redelivery again (consumer.go, "We will redo this one": o.sseq--;
# fixed upstream in 2.10.14 and 2.10.16): the next pull gets the highest
# message delivered so far -- here a gift already turned and acked -- as a
# new one, delivery count 1.  The dispatcher must not take that count at
# its word: a message at or below the highest stream sequence delivered
# before is looked up like any redelivery, found done, and not turned
# again.

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
my $st = GiftTB::start_stack(dir => $dir, motors => 'motor_01,motor_03');
my $tb = $st->{motors};
my $rules = <<'R';
    default_device = "motor_01";
    rule = ( { gift = "Motor"; device = "motor_03"; } );
R
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1), rules => $rules, rpc_timeout_ms => 1000,
    extra_nats => 'ack_wait_ms = 4000;');
my $d = GiftDispatch::start_dispatcher(%dconf);

my ($out, $rc);
$d->pause_ok('motor_03');
is(GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Motor', diamond => 2, quantity => 1,
        eventId => 'held-1')), 1, 'gift 1 (seq 1) for the paused motor');
ok(GiftTest::wait_until(20, sub {
    ($d->metric('gift_dispatcher_device_queued{device="motor_03"}') // 0) == 1
}, 0.1), '... held');
is(GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Lollipop', diamond => 5, quantity => 1,
        eventId => 'done-2')), 1, 'gift 2 (seq 2) for motor_01');
ok(GiftTest::wait_until(20, sub {
    (grep { $_->{ack}{event_id} eq 'done-2' } GiftDispatch::acks($nats->url))
        && GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 1
}, 0.1), '... turned and acked');
is($tb->totals->{devices}{motor_01}{rounds}, 5, 'motor_01 turned 5');

is($d->stop('TERM', 20), 0, 'SIGTERM: the dispatcher releases gift 1 and exits');
$d = GiftDispatch::start_dispatcher(%dconf);
ok(GiftTest::wait_until(20, sub {
    $d->log_text =~ /event held-1\b/
        || $d->log_text =~ /event done-2\b/
}, 0.1), 'a new dispatcher gets a gift');
sleep 1;                      # a command, if one went, is answered by now
my @again = grep { /event done-2\b/ } split /\n/, $d->log_text;
SKIP: {
    skip 'this nats-server did not send gift 2 again', 1 unless @again;
    diag "sent again: $again[0]";
    like($again[0], qr/event done-2 \(seq 2, delivery \d+\) was done already/,
        'gift 2, sent again as new by the server, is found done');
}
is($tb->totals->{devices}{motor_01}{rounds}, 5, 'motor_01 turned 5, once');
is($tb->totals->{totals}{duplicates}, 0, 'no command repeated');
is(scalar(grep { $_->{ack}{event_id} eq 'done-2' }
    GiftDispatch::acks($nats->url)), 1, 'gift 2: one GiftAck');

($out, $rc) = $d->ctl('resume', 'motor_03');
is($rc, 0, 'ctl resume motor_03') or diag $out;
ok(GiftTest::wait_until(30, sub {
    grep { $_->{ack}{event_id} eq 'held-1' } GiftDispatch::acks($nats->url)
}, 0.1), 'gift 1 is acknowledged in the end') or diag $d->log_text;
is($tb->totals->{devices}{motor_03}{rounds}, 2, 'motor_03 turned 2, once');

is($d->stop('TERM'), 0, 'the dispatcher exits 0 on SIGTERM');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
