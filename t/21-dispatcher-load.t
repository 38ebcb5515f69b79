#!/usr/bin/perl
# gift-dispatcher under load, with real processes:
#  - 1,000 gifts through the webhook over 8 devices: what tbsim's motors
#    executed equals the expected sums exactly, and GIFT_ACKS holds one
#    GiftAck (status ok, right rounds) per gift;
#  - SIGTERM while gifts are in flight (slow motors until then, whatever
#    the machine's speed): exit 0, and a restarted dispatcher finishes the
#    rest, with nothing turned twice and nothing lost.

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
my $use_tb = GiftTB::available() && ($ENV{GIFT_TB} // '') ne 'tbsim';
my ($mq, $tbep, $mqtt_port, $mqtt_conf);
my $start_motors = sub {
    return GiftTB::start_motors(dir => $dir, port => $tbep->port, motors => 8,
        args => [ @_ ]) if $use_tb;
    return GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port,
        args => [ @_ ]);
};
if ($use_tb) {
    $tbep = GiftTB::start_tb(dir => $dir, motors => 8, dispatchers => 1);
    ($mqtt_port, $mqtt_conf) = ($tbep->port, $tbep->mqtt_conf(1));
} else {
    $mq = GiftDispatch::start_mosquitto(dir => $dir);
    ($mqtt_port, $mqtt_conf) = ($mq->port, '');
}
my $tb = $start_motors->();

# gift G<i> turns motor_0<i>; motor_08 also takes a multiplier
my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "G$_"; device = "motor_0$_";)
    . ($_ == 8 ? ' multiplier = 2;' : '') . ' }'
} 1 .. 8) . "\n    );\n";
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $mqtt_port,
    extra_mqtt => $mqtt_conf, rules => $rules);

my $d = GiftDispatch::start_dispatcher(%dconf);
my $ngx = GiftTest::start_nginx(dir => "$dir/nginx", nats_url => $nats->url);
GiftTest::wait_until(10, sub {
    () = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
});

srand(42);
my (%want, %rounds_of);
my $batch = sub {
    my ($n, $tag) = @_;
    my @g;
    for my $i (1 .. $n) {
        my $k = 1 + int(rand(8));
        my $g = GiftTest::gift(giftName => "G$k", diamond => 1 + int(rand(20)),
            quantity => 1 + int(rand(5)), eventId => "$tag-$i");
        my $r = $g->{diamond} * $g->{quantity} * ($k == 8 ? 2 : 1);
        $want{"motor_0$k"} += $r;
        $rounds_of{$g->{eventId}} = [ "motor_0$k", $r ];
        push @g, $g;
    }
    return @g;
};
my $sum = sub { my $s = 0; $s += $_ for values %{$_[0]}; $s };
my $motors = sub {
    my $t = $tb->totals->{devices};
    return { map { $_ => $t->{$_}{rounds} } keys %$t };
};

# --------------------------------------------------------------- 1,000 gifts
my @gifts = $batch->(1000, 'load');
my $t0 = time;
my @res = GiftTest::post_many($ngx->port, 8, @gifts);
is(scalar(grep { $_->[1] == 202 } @res), 1000, '1,000 gifts accepted (202)');

my $got;
ok(GiftTest::wait_until(30, sub {
    $got = $motors->();
    $sum->($got) >= $sum->(\%want);
}, 0.1), 'the motors finished');
my $secs = time - $t0;
is_deeply($got, \%want, "per-device rounds equal the expected sums exactly");
diag sprintf('1,000 gifts webhook -> motors in %.2f s', $secs);
my $tt = $tb->totals->{totals};
is($tt->{events}, 1000, 'tbsim executed 1,000 events');
is($tt->{duplicates}, 0, '... none twice');
cmp_ok($tt->{rpcs}, '<=', 1000, "... in $tt->{rpcs} RPCs (coalesced)");

my @acks;
ok(GiftTest::wait_until(20, sub {
    @acks = GiftDispatch::acks($nats->url);
    @acks >= 1000;
}, 0.2), 'GIFT_ACKS filled');
is(scalar @acks, 1000, 'exactly 1,000 GiftAcks');
my %seen;
my @wrong = grep {
    my $a = $_->{ack};
    my $w = $rounds_of{$a->{event_id}};
    $seen{$a->{event_id}}++;
    !$w || $a->{status} ne 'ok' || $a->{device_id} ne $w->[0]
        || $a->{rounds} != $w->[1] || $_->{subject} ne "gift.acks.$w->[0]"
} @acks;
is(scalar @wrong, 0, 'each is status ok with its own device and rounds')
    or diag explain $wrong[0];
is(scalar keys %seen, 1000, 'one per gift');

# --------------------------------------------------------------- SIGTERM
# Slow motors and small commands, so that plenty is in flight.
$tb->stop;
$tb = $start_motors->('--latency-ms', '10-30');
my $base = $motors->();                         # new motors start at zero
is($sum->($base), 0, 'fresh tbsim');
%want = ();
is($d->stop('TERM', 15), 0, 'idle dispatcher: SIGTERM exits 0');

$d = GiftDispatch::start_dispatcher(%dconf,
    extra_devices => 'coalesce_max_events = 4;');
# slow motors until the SIGTERM: 3,000 gifts cannot be done by then
$tb->control('latency 200-400');
my @more = $batch->(3000, 'term');
is(GiftDispatch::js_publish_gifts($nats->url, @more), 3000,
    '3,000 more gifts stored');
ok(GiftTest::wait_until(60, sub { $sum->($motors->()) > 0 }, 0.05),
    'motors are turning');

# stop_pid kills it (undef) if it has not exited within 60 s
my $st = $d->stop('TERM', 60);
is($st, 0, 'SIGTERM under load: exit status 0, by itself');
$tb->control('latency 10-30');
my $log = $d->log_text;
like($log, qr/stopping: released \d+ queued gifts/, '... it released the queued gifts');
my $mid = $sum->($motors->());
cmp_ok($mid, '<', $sum->(\%want), 'work was left for the next dispatcher')
    or diag 'the first dispatcher finished everything before SIGTERM';

$d = GiftDispatch::start_dispatcher(%dconf);
ok(GiftTest::wait_until(120, sub {
    $sum->($motors->()) >= $sum->(\%want)
}, 0.2), 'a restarted dispatcher finishes the rest');
is_deeply($motors->(), \%want, 'per-device rounds are exact: nothing lost, '
    . 'nothing turned twice');
# a stop waits for the commands in flight: nothing is sent twice
is($tb->totals->{totals}{duplicates}, 0,
    'SIGTERM and restart: no command repeated for an executed event id');
diag 'motors: ' . JSON::PP->new->canonical->encode($tb->totals->{totals});

ok(GiftTest::wait_until(20, sub {
    @acks = GiftDispatch::acks($nats->url);
    @acks >= 4000;
}, 0.2), 'GIFT_ACKS filled');
%seen = ();
$seen{$_->{ack}{event_id}}++ for @acks;
is(scalar @acks, 4000, 'exactly one GiftAck per gift (4,000)');
is(scalar(grep { $_->{ack}{status} ne 'ok' } @acks), 0, 'all status ok');
is(scalar(grep { !$seen{$_->{eventId}} } @more), 0, 'none missing');
ok(GiftTest::wait_until(10, sub {
    my $c = GiftDispatch::consumer_state($nats->url);
    $c->{num_ack_pending} == 0 && $c->{num_pending} == 0;
}), 'the consumer has nothing pending');

is($d->stop('TERM', 15), 0, 'final SIGTERM: exit 0');
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
$ngx->stop;
done_testing();
