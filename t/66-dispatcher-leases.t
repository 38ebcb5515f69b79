#!/usr/bin/perl
# Several dispatchers from one configuration keep the motors' promises:
# one of them holds the owner lease (KV GIFT_DEVICES, key _owner) and is
# the only one pulling gifts and sending commands; the others stand by.
#  - three dispatchers, `ctl rate motor_02 30`, 60 one-round gifts for
#    motor_02, the owner stopped once half of them turned: never two
#    commands in flight to the motor at once (tbsim's max_pending, and the
#    commands' intervals read from the GiftAcks' completed_at_ms and
#    rpc_latency_us), no 59-second window above 30 rounds (tbsim's
#    max_minute_rounds: the new owner goes on with the old one's sliding
#    minute, carried in the lease), each gift one GiftAck;
#  - the owner stopped (SIGTERM) under load: another owns, every gift
#    exactly one GiftAck, no command repeated, still one in flight per
#    motor; the takeover time is in /metrics;
#  - the owner killed -9 under load: another owns once the lease expired,
#    every gift exactly one GiftAck, repeats only within what was in
#    flight (the firmware window), one in flight per motor;
#  - a dispatcher added meanwhile stands by;
#  - the owner frozen (SIGSTOP, as if cut off) under load: another owns
#    after the lease time; thawed, the old one sends nothing (its lease ran
#    out on its own clock: fencing by time), stands by and releases what
#    it held; every gift one GiftAck, one in flight per motor.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);
use lib 't/lib';
use GiftTest;
use GiftDispatch;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
my $mq = GiftDispatch::start_mosquitto(dir => $dir);
my $tb = GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port,
    args => [ '--latency-ms', '20-40' ]);

my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "G$_"; device = "motor_0$_"; })
} 1 .. 4) . "\n    );\n";
my $lease_ms = 3000;
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $mq->port,
    rules => $rules, rpc_timeout_ms => 2000,
    extra_nats => "ack_wait_ms = 4000; lease_ms = $lease_ms; "
        . 'publish_timeout_ms = 1000; publish_retry_ms = 200; '
        . 'retry_delays_ms = [ 200 ];',
    extra_devices => 'coalesce_max_events = 8;');

my $t0 = time;
my @d = (GiftDispatch::start_dispatcher(%dconf));
my $active = sub { ($_[0]->metric('gift_dispatcher_active') // 0) == 1 };
ok(GiftTest::wait_until(20, sub { $active->($d[0]) }),
    'a lone dispatcher owns the devices');
diag sprintf('a lone dispatcher active %.2f s after its start', time - $t0);
push @d, GiftDispatch::start_dispatcher(%dconf) for 1 .. 2;
like($d[$_]->log_text, qr/lease: one active dispatcher/,
    "dispatcher $_ runs the lease") for 0 .. 2;

# Who owns now (exactly one), waiting for a takeover to settle.
my $owner = sub {
    my @own;
    GiftTest::wait_until(30, sub {
        @own = grep { $d[$_]{pid} && $active->($d[$_]) } 0 .. $#d;
        @own == 1;
    }, 0.1);
    return @own == 1 ? $own[0] : undef;
};
my $o = $owner->();
is($o, 0, 'the first one stays the owner; the others stand by');

my %acked;
my $acks_of = sub {
    my ($prefix, $n) = @_;
    my @a;
    GiftTest::wait_until(240, sub {
        @a = grep { $_->{ack}{event_id} =~ /^\Q$prefix\E-/ }
            GiftDispatch::acks($nats->url);
        @a >= $n;
    }, 0.5);
    return @a;
};
my $one_each = sub {
    my ($what, $prefix, $n, @a) = @_;
    my %seen;
    $seen{$_->{ack}{event_id}}++ for @a;
    is(scalar(keys %seen), $n, "$what: every gift has its GiftAck");
    is(scalar(grep { $_ > 1 } values %seen), 0,
        "$what: none has two");
    is(scalar(grep { $_->{ack}{status} ne 'ok' } @a), 0,
        "$what: all ok");
};
# Commands to one device never overlap in time, as the GiftAcks tell:
# all GiftAcks of one command carry its completed_at_ms and rpc_latency_us.
my $overlaps = sub {
    my (@a) = @_;
    my (%cmd, $n);
    for (@a) {
        my $k = $_->{ack};
        next unless $k->{rpc_latency_us};
        $cmd{$k->{device_id}}{"$k->{completed_at_ms}/$k->{rpc_latency_us}"}
            = [ $k->{completed_at_ms} - $k->{rpc_latency_us} / 1000,
                $k->{completed_at_ms} ];
    }
    $n = 0;
    for my $dev (keys %cmd) {
        my @iv = sort { $a->[0] <=> $b->[0] } values %{$cmd{$dev}};
        for my $i (1 .. $#iv) {
            # 2 ms: the two clock readings of one answer, and rounding
            $n++ if $iv[$i][0] < $iv[$i - 1][1] - 2;
        }
    }
    return $n;
};

# ------------------------------------------------------- fleet-wide rate
my ($out, $rc) = $d[1]->ctl('rate', 'motor_02', '30');
is($rc, 0, 'ctl rate motor_02 30 (from a standby\'s configuration)');
my @g = map { GiftDispatch::gift(giftName => 'G2', eventId => "rate-$_") }
    1 .. 60;
is(GiftDispatch::js_publish_gifts($nats->url, @g), 60, '60 gifts stored');
my @a = $acks_of->('rate', 30);
is($d[0]->stop('TERM', 30), 0, 'the owner stopped after the first minute\'s '
    . '30 rounds');
$o = $owner->();
ok(defined $o && $o != 0, 'another owns (' . ($o // '?') . ')');
like($d[$o]->log_text, qr/took over the last minute's rounds of 1 /,
    'it took over the sliding minute of motor_02') if defined $o;
push @d, GiftDispatch::start_dispatcher(%dconf);
@a = $acks_of->('rate', 60);
$one_each->('rate', 'rate', 60, @a);
my $m2 = $tb->totals->{devices}{motor_02};
is($m2->{rounds}, 60, 'motor_02 turned 60 rounds');
is($m2->{max_pending}, 1, 'never two commands in flight to motor_02');
cmp_ok($m2->{max_minute_rounds}, '<=', 30,
    "no minute above 30 rounds ($m2->{max_minute_rounds})");
is($overlaps->(@a), 0, 'the GiftAcks show no two commands overlapping');
is(scalar(grep { ($d[$_]->metric('gift_dispatcher_gifts_pulled_total') // 0)
    > 0 } grep { $_ != $o } 1 .. 3), 0, 'the standbys pulled nothing');
($out, $rc) = $d[1]->ctl('rate', 'motor_02', 'default');
is($rc, 0, 'ctl rate motor_02 default');

# ------------------------------------------------------- SIGTERM under load
my $load = sub {
    my ($tag, $n) = @_;
    my @g = map { GiftDispatch::gift(giftName => 'G' . (1 + $_ % 4),
        eventId => "$tag-$_") } 1 .. $n;
    return GiftDispatch::js_publish_gifts($nats->url, @g);
};
my $dup0 = $tb->totals->{totals}{duplicates};
$tb->control('latency 100-200');
is($load->('term', 400), 400, '400 gifts stored');
my $rounds0 = $tb->totals->{totals}{rounds};
GiftTest::wait_until(30, sub { $tb->totals->{totals}{rounds} > $rounds0 + 20 },
    0.05);
$o = $owner->();
my $old = $d[$o];
ok($o != 0, "the owner is dispatcher $o");
is($old->stop('TERM', 30), 0, "the owner (dispatcher $o) stopped under load, "
    . 'exit 0');
like($old->log_text, qr/lease: released/, 'it released its lease');
$old->{pid} = undef;
my $n = $owner->();
ok(defined $n && $n != $o, 'another dispatcher owns (' . ($n // '?') . ')');
my $tk = defined $n ? $d[$n]->metric('gift_dispatcher_takeover_seconds')
                    : undef;
ok(defined $tk, 'its takeover time is in /metrics');
diag 'takeover after SIGTERM: ' . ($tk // '?') . ' s without an owner';
like($d[$n]->log_text, qr/took over from .* lease released/,
    'the takeover is logged') if defined $n;
@a = $acks_of->('term', 400);
$one_each->('SIGTERM', 'term', 400, @a);
is($tb->totals->{totals}{duplicates} - $dup0, 0,
    'SIGTERM: no command repeated');
is($overlaps->(@a), 0, 'SIGTERM: no two commands to a motor overlapping');

# ------------------------------------------------------- kill -9 under load
push @d, GiftDispatch::start_dispatcher(%dconf);
ok(!$active->($d[-1]), 'a dispatcher added meanwhile stands by');
$dup0 = $tb->totals->{totals}{duplicates};
is($load->('kill', 400), 400, '400 gifts stored');
$rounds0 = $tb->totals->{totals}{rounds};
GiftTest::wait_until(30, sub { $tb->totals->{totals}{rounds} > $rounds0 + 20 },
    0.05);
$o = $owner->();
$d[$o]->stop('KILL', 5);
$d[$o]{pid} = undef;
my $tkill = time;
$n = $owner->();
ok(defined $n && $n != $o, "after kill -9 of dispatcher $o another owns ("
    . ($n // '?') . ')');
$tk = defined $n ? $d[$n]->metric('gift_dispatcher_takeover_seconds')
                 : undef;
ok(defined $tk && $tk * 1000 >= $lease_ms,
    'the takeover waited for the lease to expire (' . ($tk // '?') . ' s)');
diag sprintf('takeover after kill -9: %s s without an owner (lease %d ms; '
    . 'seen active %.1f s after the kill)', $tk // '?', $lease_ms,
    time - $tkill);
@a = $acks_of->('kill', 400);
$one_each->('kill -9', 'kill', 400, @a);
my $dups = $tb->totals->{totals}{duplicates} - $dup0;
# what was in flight: one command of up to 8 gifts per device, 4 devices,
# and the GiftAcks not yet stored (the same again)
cmp_ok($dups, '<=', 2 * 8 * 4,
    "kill -9: $dups commands' events repeated, within what was in flight");

# ------------------------------------------------------- an owner frozen
is($load->('frozen', 300), 300, '300 gifts stored');
$rounds0 = $tb->totals->{totals}{rounds};
GiftTest::wait_until(30, sub { $tb->totals->{totals}{rounds} > $rounds0 + 20 },
    0.05);
$o = $owner->();
my $frozen = $d[$o];
my $off = length $frozen->log_text;
kill 'STOP', $frozen->pid;
{
    local $frozen->{pid} = undef;      # not asked while frozen
    $n = $owner->();
}
ok(defined $n && $n != $o, "dispatcher $o frozen: another owns ("
    . ($n // '?') . ')');
kill 'CONT', $frozen->pid;
ok(GiftTest::wait_until(30, sub {
    substr($frozen->log_text, $off) =~ /no longer the active dispatcher/ }),
    'thawed, the old owner knows it is no longer the owner');
ok(!$active->($frozen), '... and stands by');
@a = $acks_of->('frozen', 300);
$one_each->('frozen owner', 'frozen', 300, @a);
my $t = $tb->totals;
is(scalar(grep { $t->{devices}{$_}{max_pending} > 1 } keys %{$t->{devices}}),
    0, 'never two commands in flight to one motor, through all takeovers');

for my $x (@d) {
    next unless $x->{pid};
    is($x->stop('TERM', 30), 0, 'SIGTERM: exit 0');
}
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
done_testing();
