#!/usr/bin/perl
# A crash exactly between a device's answer and the ack, with real
# processes: the failpoint GIFT_DISPATCHER_FAILPOINT=exit_before_ack=N makes
# the dispatcher _exit just before its N-th ack, when that gift's GiftAck
# (and completion marker) are stored.  After a restart, the redelivered
# gifts that were done are acknowledged without a second command:
#  - found by their marker in KV GIFT_DONE (the default), their GiftAck
#    published again and deduplicated by GIFT_ACKS;
#  - with nats.done_markers = false, found by a probe of GIFT_ACKS'
#    duplicate window (nothing written per gift).
# And a crash with acks held back (nats.ack_linger_ms, the failpoint
# exit_with_held_acks=N): those gifts come back and are found done.  And a
# NATS connection that breaks with acks held back (break_with_held_acks=N,
# the dispatcher goes on): they are dropped, not sent on the next
# connection, and their gifts come back and are found done.
# Each way the motors' totals are exact and each gift has one GiftAck.

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
my $st = GiftTB::start_stack(dir => $dir, motors => 8,
    motor_args => [ '--latency-ms', '2-6' ], tbsim_args => [ '--latency-ms', '2-6' ]);
my $tb = $st->{motors};

my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "G$_"; device = "motor_0$_"; })
} 1 .. 8) . "\n    );\n";
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1),
    rules => $rules, rpc_timeout_ms => 1000,
    extra_nats => 'ack_wait_ms = 2000; publish_timeout_ms = 1000; '
        . 'publish_retry_ms = 200; retry_delays_ms = [ 200 ];',
    extra_devices => 'coalesce_max_events = 16;');

my (%want, %accepted);
my $motors = sub {
    my $t = $tb->totals->{devices};
    return { map { $_ => $t->{$_}{rounds} } keys %$t };
};
my $sum = sub { my $s = 0; $s += $_ for values %{$_[0]}; $s };
srand(3);

# $how: 'exit' before an ack, 'held' (exit with acks held back), 'break'
# (the NATS connection breaks with acks held back; no crash)
sub crash_and_recover {
    my ($what, $extra, $tag, $how) = @_;
    my $held = $how ne 'exit';
    my $d;
    {
        local $ENV{GIFT_DISPATCHER_FAILPOINT} = {
            exit => 'exit_before_ack=300', held => 'exit_with_held_acks=300',
            break => 'break_with_held_acks=300' }->{$how};
        $d = GiftDispatch::start_dispatcher(%dconf,
            extra_nats => $dconf{extra_nats} . $extra);
    }
    my @g;
    for my $i (1 .. 800) {
        my $k = 1 + int(rand(8));
        my $g = GiftDispatch::gift(giftName => "G$k",
            diamond => 1 + int(rand(9)), quantity => 1, eventId => "$tag-$i");
        $want{"motor_0$k"} += $g->{diamond};
        $accepted{$g->{eventId}} = 1;
        push @g, $g;
    }
    my $dup0 = $tb->totals->{totals}{duplicates};
    is(GiftDispatch::js_publish_gifts($nats->url, @g), 800,
        "$what: 800 gifts stored");
    my ($nheld, $victim);
    if ($how eq 'break') {
        my $re = qr/failpoint: breaking the NATS connection with (\d+) acks held back, the last of ($tag-\d+)/;
        ok(GiftTest::wait_until(20, sub { $d->log_text =~ $re }, 0.05),
            "$what: the failpoint broke the connection");
        ($nheld, $victim) = $d->log_text =~ $re;
        ok($victim && $nheld >= 1, "$what: ... with the acks of "
            . ($nheld // 0) . " gifts held back, the last of " . ($victim // '?'));
        my $dropped_re = qr/NATS: (\d+) acks held back when the hot connection broke not sent/;
        GiftTest::wait_until(5, sub { $d->log_text =~ $dropped_re }, 0.05);
        my ($dropped) = $d->log_text =~ $dropped_re;
        is($dropped, $nheld, "$what: ... not sent on the next connection");
        ok(GiftTest::alive($d->pid), "$what: ... the dispatcher went on");
    } else {
        ok(GiftTest::wait_until(20, sub { !GiftTest::alive($d->pid) }, 0.05),
            "$what: the failpoint crashed the dispatcher");
        if ($held) {
            ($nheld, $victim) = $d->log_text =~
                /failpoint: exiting with (\d+) acks held back, the last of ($tag-\d+)/;
            ok($victim && $nheld >= 1, "$what: ... with the acks of "
                . ($nheld // 0) . " gifts held back, the last of " . ($victim // '?'));
        } else {
            ($victim) = $d->log_text =~
                /failpoint: exiting before the ack of ($tag-\d+)/;
            ok($victim, "$what: ... just before acking $victim");
        }
        $d->stop('KILL', 5);
        $d = GiftDispatch::start_dispatcher(%dconf,
            extra_nats => $dconf{extra_nats} . $extra);
    }
    ok(GiftTest::wait_until(30, sub {
        $sum->($motors->()) >= $sum->(\%want)
    }, 0.1), "$what: the motors finished");
    is_deeply($motors->(), \%want, "$what: per-device rounds exact");
    is($tb->totals->{totals}{events}, scalar(keys %accepted),
        "$what: each gift executed once");
    my @acks;
    GiftTest::wait_until(20, sub {
        @acks = GiftDispatch::acks($nats->url);
        @acks >= keys %accepted;
    }, 0.1);
    my %seen;
    $seen{$_->{ack}{event_id}}++ for @acks;
    is(scalar @acks, scalar(keys %accepted), "$what: one GiftAck per gift");
    is(scalar(grep { !$seen{$_} } keys %accepted), 0, "$what: none missing");
    ok(GiftTest::wait_until(10, sub {
        ($d->metric('gift_dispatcher_done_hits_total') // 0) >= ($nheld || 1)
    }, 0.1), "$what: redeliveries found done were acked without a command"
        . ($held ? " (at least the $nheld held back)" : ''));
    # the redeliveries come in one burst after the ack wait, the
    # victim's not necessarily among the first counted above
    ok(GiftTest::wait_until(10, sub {
        $d->log_text =~ /event \Q$victim\E .*was done already/
    }, 0.1), "$what: ... $victim among them");
    is(scalar(grep { $_->{ack}{event_id} eq $victim } @acks), 1,
        "$what: ... its GiftAck is there once");
    # the crash came after an answer: that gift is not sent again; the
    # commands in flight then (8 devices, 16 gifts each, one command
    # each, plus one answered whose marker had not left) may be, and the
    # motors' event-id window absorbs them
    # (a connection that breaks loses no command: none is repeated)
    cmp_ok($tb->totals->{totals}{duplicates} - $dup0, '<=',
        $how eq 'break' ? 0 : 2 * 8 * 16,
        "$what: commands repeated for executed ids within the in-flight "
        . 'bound');
    diag "$what: found done " . $d->metric('gift_dispatcher_done_hits_total')
        . '; commands repeated and ignored by the motors (RPCs in flight at '
        . 'the crash): ' . ($tb->totals->{totals}{duplicates} - $dup0);
    is($d->stop('TERM', 15), 0, "$what: SIGTERM: exit 0");
}

crash_and_recover('GIFT_DONE markers', '', 'mk', 'exit');
crash_and_recover('GIFT_ACKS probe', ' done_markers = false;', 'pr', 'exit');
# a crash while acks wait for company (nats.ack_linger_ms; 1000 is cut to
# a tenth of the consumer's ack wait, here 200 ms): their gifts come back
# and are found done
crash_and_recover('held-back acks', ' ack_linger_ms = 1000;', 'hb', 'held');
# the connection breaks while acks wait for company: they are not sent on
# the next one (a stopping server may have lost their gifts' markers)
crash_and_recover('held-back acks, connection broken',
    ' ack_linger_ms = 1000;', 'hbb', 'break');

ok(GiftTest::wait_until(10, sub {
    GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 0
}, 0.1), 'nothing left unacked');
$st->stop;
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
done_testing();
