#!/usr/bin/perl
# Issue 14, point 3 (existing deployments): an older setup -- consumer
# MaxDeliver 5, GIFT_DONE keys kept 10 minutes, GIFT_STREAKS an hour -- is
# never changed by provisioning (`giftctl setup`, the dispatcher at start);
# the dispatcher refuses to start on it, saying why and what to run;
# `giftctl setup --upgrade` raises exactly those settings, after which the
# dispatcher starts and turns gifts.  `giftctl dlq replay` refuses a gift
# past max_gift_age, and the dispatcher dead-letters such a gift "expired".

use strict;
use warnings;
use Test::More;
use JSON::PP ();
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $JSON = JSON::PP->new->canonical;
my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
# ThingsBoard: the stand-in and its motors (GIFT_TB=tbsim: tbsim on mosquitto)
my $st = GiftTB::start_stack(dir => $dir, motors => 8);
my $tb = $st->{motors};

my $NS = 1_000_000_000;
my $api = sub {
    my ($subj, $req) = @_;
    my $c = GiftDispatch::NatsClient->new($nats->url);
    my ($r) = $c->requests($subj, $JSON->encode($req));
    $c->close;
    return eval { $JSON->decode($r // '') } // {};
};

# --------------------------------------------------------------- an older setup
my $r = $api->('$JS.API.STREAM.CREATE.GIFTS', { name => 'GIFTS',
    subjects => [ 'gift.events.>' ], storage => 'file', retention => 'limits',
    discard => 'new', max_age => 7 * 86400 * $NS,
    duplicate_window => 600 * $NS, num_replicas => 1, max_msgs => -1,
    max_bytes => -1 });
ok(!$r->{error}, 'stream GIFTS as an older setup made it') or diag explain $r;
$r = $api->('$JS.API.CONSUMER.DURABLE.CREATE.GIFTS.dispatcher', {
    stream_name => 'GIFTS', config => { durable_name => 'dispatcher',
    ack_policy => 'explicit', deliver_policy => 'all',
    ack_wait => 30 * $NS, max_deliver => 5 } });
is($r->{config}{max_deliver}, 5, 'its consumer: MaxDeliver 5') or diag explain $r;
for ([ GIFT_DONE => 600 ], [ GIFT_STREAKS => 3600 ]) {
    my ($b, $ttl) = @$_;
    $r = $api->("\$JS.API.STREAM.CREATE.KV_$b", { name => "KV_$b",
        subjects => [ "\$KV.$b.>" ], storage => 'file', discard => 'new',
        max_msgs_per_subject => 1, max_age => $ttl * $NS,
        allow_rollup_hdrs => JSON::PP::true, deny_delete => JSON::PP::true,
        num_replicas => 1, max_msgs => -1, max_bytes => -1 });
    ok(!$r->{error}, "KV bucket $b keeps keys $ttl s") or diag explain $r;
}
my $consumer = sub {
    $api->('$JS.API.CONSUMER.INFO.GIFTS.dispatcher', {})->{config}{max_deliver};
};
my $ttl = sub {
    int(($api->("\$JS.API.STREAM.INFO.KV_$_[0]", {})->{config}{max_age} // 0)
        / $NS);
};

# --------------------------------------------------------------- left alone
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup on it') or diag $out;
like($out, qr/max_deliver 5 \(expected -1\); leaving it/,
    '... reports MaxDeliver 5 and leaves it');
is($consumer->(), 5, '... unchanged: MaxDeliver 5');
is($ttl->('GIFT_DONE'), 600, '... GIFT_DONE TTL unchanged');

my %conf = (dir => $dir, nats_url => $nats->url, mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1));
my $d = eval { GiftDispatch::start_dispatcher(%conf) };
ok(!$d, 'the dispatcher refuses to start on it');
my $why = $@;
like($why, qr/consumer dispatcher has max_deliver 5/, '... naming MaxDeliver');
like($why, qr/KV bucket GIFT_DONE keeps keys 600 s/, '... and the TTLs');
like($why, qr/not starting: run `giftctl -s URL setup --upgrade --state-ttl 4200`/,
    '... and what to run');
is($consumer->(), 5, '... having changed nothing');

# --------------------------------------------------------------- upgraded
($out, $rc) = GiftTest::giftctl($nats->url, 'setup', '--upgrade');
is($rc, 0, 'giftctl setup --upgrade') or diag $out;
like($out, qr/upgraded consumer dispatcher: max_deliver 5 -> -1/,
    '... raises MaxDeliver to -1');
like($out, qr/upgraded KV bucket GIFT_DONE: ttl 600 s -> 4200 s/,
    '... and the TTLs') or diag $out;
is($consumer->(), -1, 'MaxDeliver is -1');
is($ttl->('GIFT_DONE'), 4200, 'GIFT_DONE keeps keys 4200 s');
is($ttl->('GIFT_STREAKS'), 4200, 'GIFT_STREAKS keeps keys 4200 s');

$d = GiftDispatch::start_dispatcher(%conf);
ok($d, 'the dispatcher starts now');
GiftDispatch::js_publish_gifts($nats->url, GiftDispatch::gift(
    giftName => 'Rose', diamond => 1, quantity => 4, eventId => 'up-1'));
my @a;
ok(GiftTest::wait_until(20, sub {
    @a = grep { $_->{ack}{event_id} eq 'up-1' } GiftDispatch::acks($nats->url);
}, 0.1), 'and turns a gift');
is($a[0]{ack}{status}, 'ok', '... ok');

# --------------------------------------------------------------- max_gift_age
# a gift received two hours ago (as a late DLQ replay, or a backlog would be)
my $old = GiftDispatch::gift(giftName => 'Rose', diamond => 1, quantity => 2,
    eventId => 'old-1');
my $pb = GiftDispatch::gift_event_pb($old);
# field 11 (received_at_ms) last wins in protobuf: two hours ago
my $v = int(time() * 1000) - 2 * 3600 * 1000;
my $vi = '';
while ($v >= 0x80) { $vi .= chr(($v & 0x7f) | 0x80); $v = int($v / 128); }
$vi .= chr($v);
$old->{raw} = $pb . chr(11 << 3) . $vi;
GiftDispatch::js_publish_gifts($nats->url, $old);
ok(GiftTest::wait_until(20, sub {
    @a = grep { $_->{ack}{event_id} eq 'old-1' } GiftDispatch::acks($nats->url);
}, 0.1), 'a gift past max_gift_age is acknowledged');
is($a[0]{ack}{status}, 'dead_letter', '... dead_letter');
is($a[0]{ack}{reason}, 'expired', '... reason expired');
is($tb->totals->{devices}{motor_02}{rounds}, 4, '... the motor did not turn');

($out, $rc) = GiftTest::giftctl($nats->url, 'dlq', 'replay', '--all');
isnt($rc, 0, 'giftctl dlq replay refuses it');
like($out, qr/old-1\) was received \d+ s ago, past max_gift_age/, '... saying why');
is(scalar(grep { $_->{event}{event_id} eq 'old-1' }
    GiftDispatch::dead_letters($nats->url)), 1, '... it stays in the DLQ');

is($d->stop('TERM'), 0, 'the dispatcher exits 0');
$st->stop;
done_testing();
