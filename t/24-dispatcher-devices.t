#!/usr/bin/perl
# Devices are physical, with real processes:
#  - a burst of 500 gifts to one busy motor ends in far fewer RPCs
#    (coalesced, within the configured caps) with the exact total and 500
#    GiftAcks, while another device proceeds in parallel;
#  - a rounds-per-minute limit holds the excess (never drops it);
#  - a paused device holds its gifts, keeping their JetStream lease past
#    the ack wait (InProgress: no redelivery), until resumed; others go on;
#    by KV switch (`gift-dispatcher ctl`) and by configuration + SIGHUP;
#  - /metrics: valid Prometheus text (promtool) with the right values.

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
my $tbs = GiftTB::start_stack(dir => $dir,
    motors => join(',', map { "motor_$_" } qw(busy side cap rate pause other conf)),
    motor_args => [ '--latency-ms', '15-25' ], tbsim_args => [ '--latency-ms', '15-25' ]);
my $tb = $tbs->{motors};

my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "$_"; device = "motor_$_"; })
} qw(busy side cap rate pause other conf)) . "\n    );\n";
# max_held: every gift held once, so that pulled = gifts below (the share
# of one device is t/29-dispatcher-fairness.t's)
my $devconf = 'coalesce_max_events = 32; coalesce_max_rounds = 1000; '
    . 'max_held = 1000;';
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $tbs->{port},
    extra_mqtt => $tbs->conf(1),
    rules => $rules, rpc_timeout_ms => 1000,
    extra_nats => 'ack_wait_ms = 2000;',
    extra_devices => $devconf);
my $d = GiftDispatch::start_dispatcher(%dconf);
my $ngx = GiftTest::start_nginx(dir => "$dir/nginx", nats_url => $nats->url);
GiftTest::wait_until(10, sub {
    () = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
});

my $dev = sub { $tb->totals->{devices}{$_[0]} // {} };
my $acks_for = sub {
    my ($ids, $secs) = @_;
    my %want = map { $_ => 1 } @$ids;
    my @a;
    GiftTest::wait_until($secs // 20, sub {
        @a = grep { $want{$_->{ack}{event_id}} }
            GiftDispatch::acks($nats->url);
        @a >= keys %want;
    }, 0.2);
    return @a;
};
my $n = 0;
my $gift = sub {
    my ($name, $diamond, $qty) = @_;
    return GiftTest::gift(giftName => $name, diamond => $diamond,
        quantity => $qty, eventId => "dv$$-" . ++$n);
};

# --------------------------------------------------------------- burst of 500
srand(5);
my (@burst, $want);
for (1 .. 500) {
    my $g = $gift->('busy', 1 + int(rand(9)), 1 + int(rand(3)));
    $want += $g->{diamond} * $g->{quantity};
    push @burst, $g;
}
# the burst is stored at once, as the webhook would under a flood; the
# other device's gifts come through the webhook meanwhile
is(GiftDispatch::js_publish_gifts($nats->url, @burst), 500,
    '500 gifts stored at once');
my @side = map { $gift->('side', 2, 1) } 1 .. 40;
my @res = GiftTest::post_many($ngx->port, 4, @side);
is(scalar(grep { $_->[1] == 202 } @res), 40, '40 more accepted (202)');
ok(GiftTest::wait_until(30, sub {
    ($dev->('motor_busy')->{rounds} // 0) >= $want
}, 0.1), 'the busy motor finished');
my $b = $dev->('motor_busy');
is($b->{rounds}, $want, "exact total: $want rounds");
is($b->{events}, 500, '500 gifts executed');
is($b->{duplicates}, 0, '... none twice');
cmp_ok($b->{rpcs}, '<=', 40, "in far fewer RPCs ($b->{rpcs})");
cmp_ok($b->{rpcs}, '>=', 16, '... none above coalesce_max_events (32)');
ok(GiftTest::wait_until(10, sub {
    ($dev->('motor_side')->{rounds} // 0) >= 80 }, 0.1),
    'another device proceeded alongside');
is($dev->('motor_side')->{rounds}, 80, '... exactly');
my @a = $acks_for->([ map { $_->{eventId} } @burst ]);
is(scalar @a, 500, '500 GiftAcks for the burst');
my %r = map { $_->{eventId} => $_->{diamond} * $_->{quantity} } @burst;
is(scalar(grep { $_->{ack}{status} ne 'ok'
    || $_->{ack}{rounds} != $r{$_->{ack}{event_id}}
    || $_->{ack}{device_id} ne 'motor_busy' } @a), 0,
    '... each ok, with its own rounds');

# the rounds cap: gifts of 400 rounds, at most 1000 per command
my @cap = map { $gift->('cap', 200, 2) } 1 .. 12;
GiftDispatch::js_publish_gifts($nats->url, @cap);
ok(GiftTest::wait_until(15, sub {
    ($dev->('motor_cap')->{rounds} // 0) >= 4800
}, 0.1), 'rounds cap: the motor finished');
cmp_ok($dev->('motor_cap')->{rpcs}, '>=', 6,
    'no command above coalesce_max_rounds (2 gifts of 400 each at most)');

# --------------------------------------------------------------- rate limit
my ($out, $rc) = $d->ctl('rate', 'motor_rate', '30');
is($rc, 0, 'ctl rate motor_rate 30') or diag $out;
ok(GiftTest::wait_until(5, sub {
    ($d->metric('gift_dispatcher_device_rate_limit{device="motor_rate"}')
        // -1) == 30
}, 0.1), 'the dispatcher follows the KV switch (/metrics shows 30)');
my @rate = map { $gift->('rate', 1, 1) } 1 .. 50;
GiftDispatch::js_publish_gifts($nats->url, @rate);
ok(GiftTest::wait_until(10, sub {
    ($dev->('motor_rate')->{rounds} // 0) >= 30 }, 0.1),
    'rate limit: the first 30 rounds went');
# the dispatcher had its chance: it holds the other 20 and said "wait"
ok(GiftTest::wait_until(60, sub {
    ($d->metric('gift_dispatcher_rate_waits_total') // 0) > 0
        && ($d->metric('gift_dispatcher_gifts_held') // 0) >= 20 }, 0.1),
    '... the other 20 held, waiting for the limit');
is($dev->('motor_rate')->{rounds}, 30,
    '... and no more within the minute');
cmp_ok($d->metric('gift_dispatcher_rate_waits_total'), '>', 0,
    '... the device waits (rate_waits_total)');
($out, $rc) = $d->ctl('rate', 'motor_rate', 'default');
is($rc, 0, 'ctl rate motor_rate default (no limit)') or diag $out;
ok(GiftTest::wait_until(10, sub {
    ($dev->('motor_rate')->{rounds} // 0) >= 50 }, 0.1),
    'the excess waited and then went: nothing dropped');
is($dev->('motor_rate')->{rounds}, 50, '... exactly 50');
is(scalar($acks_for->([ map { $_->{eventId} } @rate ])), 50,
    '... 50 GiftAcks');

# --------------------------------------------------------------- pause (KV)
($out, $rc) = $d->ctl('pause', 'motor_pause');
is($rc, 0, 'ctl pause motor_pause') or diag $out;
ok(GiftTest::wait_until(5, sub {
    ($d->metric('gift_dispatcher_device_paused{device="motor_pause"}')
        // 0) == 1
}, 0.1), '/metrics: motor_pause paused');
my $inprog = $d->metric('gift_dispatcher_in_progress_total');
my @p = map { $gift->('pause', 3, 1) } 1 .. 20;
my @o = map { $gift->('other', 1, 1) } 1 .. 20;
GiftDispatch::js_publish_gifts($nats->url, @p, @o);
ok(GiftTest::wait_until(10, sub {
    ($dev->('motor_other')->{rounds} // 0) >= 20 }, 0.1),
    'other devices proceed while one is paused');
# held across twice the consumer's ack wait (2 s): InProgress goes out for
# each held gift every second, so 4 for each of the 20
ok(GiftTest::wait_until(60, sub {
    ($d->metric('gift_dispatcher_in_progress_total') // 0) >= $inprog + 80
}, 0.2), 'the 20 held gifts kept alive (InProgress) for 4 s');
is($dev->('motor_pause')->{rpcs} // 0, 0, 'the paused motor got nothing');
my $c = GiftDispatch::consumer_state($nats->url);
is($c->{num_ack_pending}, 20, 'its 20 gifts are held, unacked');
is($c->{num_redelivered}, 0, '... and never redelivered past the ack wait');
cmp_ok($d->metric('gift_dispatcher_in_progress_total'), '>', $inprog,
    '... thanks to InProgress');
is(scalar(grep { $_->{ack}{event_id} =~ /^dv/ && $_->{ack}{device_id} eq
    'motor_pause' } GiftDispatch::acks($nats->url)), 0, 'no GiftAck yet');
($out, $rc) = $d->ctl('show');
like($out, qr/motor_pause\.paused = true/, 'ctl show lists the switch');
($out, $rc) = $d->ctl('resume', 'motor_pause');
is($rc, 0, 'ctl resume motor_pause') or diag $out;
ok(GiftTest::wait_until(10, sub {
    ($dev->('motor_pause')->{rounds} // 0) >= 60 }, 0.1),
    'resumed: the held gifts went');
is($dev->('motor_pause')->{rounds}, 60, '... exactly 20 x 3');
@a = $acks_for->([ map { $_->{eventId} } @p ]);
is(scalar @a, 20, '... 20 GiftAcks');
is(scalar(grep { $_->{ack}{attempts} != 1 } @a), 0, '... all first attempts');

# --------------------------------------------------------------- pause (conf)
my $conf = GiftTest::slurp($d->conf);
(my $paused = $conf) =~ s/devices = \{/devices = {\n    device = ( { id = "motor_conf"; paused = true; } );/
    or die;
GiftTest::spurt($d->conf, $paused);
$d->signal('HUP');
ok(GiftTest::wait_until(5, sub {
    ($d->metric('gift_dispatcher_device_paused{device="motor_conf"}') // 0)
        == 1 }, 0.1), 'SIGHUP: devices.device paused = true');
my @cf = map { $gift->('conf', 1, 1) } 1 .. 5;
my $later = $gift->('other', 1, 1);
my $other0 = $dev->('motor_other')->{rounds} // 0;
GiftDispatch::js_publish_gifts($nats->url, @cf, $later);
# a gift stored after them, for another motor, has turned: the dispatcher
# has had the five
ok(GiftTest::wait_until(60, sub {
    ($dev->('motor_other')->{rounds} // 0) > $other0
        && ($d->metric('gift_dispatcher_gifts_held') // 0) >= 5 }, 0.1),
    '... a later gift for another motor went, the five are held');
is($dev->('motor_conf')->{rpcs} // 0, 0, '... holds its gifts');
GiftTest::spurt($d->conf, $conf);
$d->signal('HUP');
ok(GiftTest::wait_until(10, sub {
    ($dev->('motor_conf')->{rounds} // 0) >= 5 }, 0.1),
    'SIGHUP without the pause: they went');

# --------------------------------------------------------------- /metrics
my $total = 540 + 12 + 50 + 40 + 5 + 1;
# the motors are done; wait for the last GiftAcks and acks too
ok(GiftTest::wait_until(60, sub {
    ($d->metric('gift_dispatcher_gifts_acked_total{status="ok"}') // 0)
        >= $total && ($d->metric('gift_dispatcher_gifts_held') // 1) == 0
}, 0.1), 'every gift acked');
my ($st, $text) = $d->metrics;
is($st, 200, 'GET /metrics: 200');
SKIP: {
    my $promtool = `command -v promtool 2>/dev/null`;
    chomp $promtool;
    GiftTest::skip_unless($promtool, 'promtool not installed', 1);
    open(my $p, '|-', "'$promtool' check metrics >'$dir/promtool.out' 2>&1")
        or die;
    print $p $text;
    close $p;
    is($? >> 8, 0, 'promtool check metrics: valid')
        or diag GiftTest::slurp("$dir/promtool.out");
}
my %m = map { /^(\S+) (\S+)$/ ? ($1 => $2) : () } split /\n/, $text;
is($m{'gift_dispatcher_gifts_acked_total{status="ok"}'}, $total,
    "acked ok: $total");
is($m{'gift_dispatcher_gifts_pulled_total'}, $total, "pulled: $total");
cmp_ok($m{'gift_dispatcher_gifts_coalesced_total'}, '>', 400, 'coalesced');
is($m{'gift_dispatcher_rpcs_total{outcome="sent"}'},
    $tb->totals->{totals}{rpcs}, 'RPCs sent = what tbsim received');
is($m{'gift_dispatcher_rpc_latency_seconds_count'},
    $m{'gift_dispatcher_rpcs_total{outcome="ok"}'},
    'latency histogram: one observation per answered RPC');
# a lower bound (tbsim answers after 15-25 ms): true however slow the machine
is($m{'gift_dispatcher_rpc_latency_seconds_bucket{le="0.01"}'}, 0,
    '... no RPC of 15-25 ms in the 10 ms bucket');
is($m{'gift_dispatcher_rpc_latency_seconds_bucket{le="+Inf"}'},
    $m{'gift_dispatcher_rpc_latency_seconds_count'}, '... +Inf holds them all');
is($m{'gift_dispatcher_nats_connected'}, 1, 'NATS connected');
is($m{'gift_dispatcher_mqtt_connected'}, 1, 'MQTT connected');
is($m{'gift_dispatcher_consumer_lag'}, 0, 'consumer lag 0');
is($m{'gift_dispatcher_dlq_messages'}, 0, 'DLQ empty');
is($m{'gift_dispatcher_gifts_held'}, 0, 'nothing held');
is($m{'gift_dispatcher_device_paused{device="motor_pause"}'}, 0,
    'motor_pause no longer paused');
is($m{'gift_dispatcher_device_rounds_total{device="motor_busy"}'}, $want,
    'per-device rounds');
is(HTTP::Tiny->new->get('http://127.0.0.1:' . $d->metrics_port . '/x')
    ->{status}, 404, 'other paths: 404');

is($tb->totals->{totals}{duplicates}, 0, 'no command executed twice');
is($d->stop('TERM', 15), 0, 'SIGTERM: exit 0');
$tbs->stop;
is_deeply([ grep { / error gift-dispatcher: / } split /\n/, $d->log_text ],
    [], 'no error logged');
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
$ngx->stop;
done_testing();
