#!/usr/bin/perl
# gift-dispatcher when its peers fail, under load, with real processes:
# ThingsBoard (the stand-in's endpoint) is killed -9 and restarted on the
# same port (GIFT_TB=tbsim: mosquitto restarts under tbsim), the NATS server restarts, the dispatcher itself
# is killed with SIGKILL.  Each time the motors' totals end exactly as
# expected (nothing lost, nothing turned twice) and every gift has exactly
# one GiftAck.

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
    motor_args => [ '--latency-ms', '2-8' ], tbsim_args => [ '--latency-ms', '2-8' ]);
my $tb = $st->{motors};

my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "G$_"; device = "motor_0$_"; })
} 1 .. 8) . "\n    );\n";
# A short ack wait (the dispatcher creates the consumer), so that what a
# killed dispatcher held comes back within the test's time.
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1), rules => $rules, rpc_timeout_ms => 1000,
    # the default lease (5 s): the NATS outage below outlasts its sending
    # window (4 s), so the dispatcher fences itself during it
    extra_nats => 'ack_wait_ms = 3000; publish_timeout_ms = 1000; '
        . 'publish_retry_ms = 200; retry_delays_ms = [ 200 ];',
    extra_devices => 'coalesce_max_events = 8;');
my $d = GiftDispatch::start_dispatcher(%dconf);

srand(7);
my (%want, @ids);
my $batch = sub {
    my ($n, $tag) = @_;
    my @g;
    for my $i (1 .. $n) {
        my $k = 1 + int(rand(8));
        my $g = GiftDispatch::gift(giftName => "G$k",
            diamond => 1 + int(rand(9)), quantity => 1 + int(rand(3)),
            eventId => "$tag-$i");
        $want{"motor_0$k"} += $g->{diamond} * $g->{quantity};
        push @ids, $g->{eventId};
        push @g, $g;
    }
    return @g;
};
my $sum = sub { my $s = 0; $s += $_ for values %{$_[0]}; $s };
my $motors = sub {
    my $t = $tb->totals->{devices};
    return { map { $_ => $t->{$_}{rounds} } keys %$t };
};
# Commands for event ids the motors had already executed (tbsim counts and
# ignores them, as the firmware's event-id window does): where the design
# relies on that window (a crash or a lost reply between a command and its
# answer), a few commands' gifts per device (8 devices x 8 gifts: the one
# in flight, resent by the retry and by libmosquitto's QoS 1 resend after
# a reconnect, and the one answered whose completion marker had not left
# yet); 0 where it promises exactly once.
my $dup0 = 0;
my $dups = sub { $tb->totals->{totals}{duplicates} };
# Which gifts were repeated, and what the dispatcher said about them.
my $why = sub {
    my ($n) = @_;
    my @rep = GiftTest::slurp($tb->log) =~ /event (\S+) repeated/g;
    my @ids = @rep[($#rep - $n + 1 < 0 ? 0 : $#rep - $n + 1) .. $#rep];
    @ids = @ids[0 .. 4] if @ids > 5;
    my $log = $d->log_text;
    for my $id (@ids) {
        diag "repeated: $id";
        diag "  $_" for grep { /\b\Q$id\E\b/ } split /\n/, $log;
    }
    diag "dispatcher log: lease and connections:";
    diag "  $_" for grep { /lease|NATS:|active|released|timed out|stall/ }
        split /\n/, $log;
};
my $settled = sub {
    my ($what, $max_dup) = @_;
    ok(GiftTest::wait_until(45, sub {
        $sum->($motors->()) >= $sum->(\%want)
    }, 0.2), "$what: the motors finished");
    is_deeply($motors->(), \%want, "$what: per-device rounds exact");
    my @acks;
    GiftTest::wait_until(20, sub {
        @acks = GiftDispatch::acks($nats->url);
        @acks >= @ids;
    }, 0.2);
    my %seen;
    $seen{$_->{ack}{event_id}}++ for @acks;
    is(scalar @acks, scalar @ids, "$what: one GiftAck per gift");
    is(scalar(grep { !$seen{$_} } @ids), 0, "$what: none missing");
    is(scalar(grep { $_->{ack}{status} ne 'ok' } @acks), 0,
        "$what: all status ok");
    if (defined $max_dup) {
        my $n = $dups->() - $dup0;
        cmp_ok($n, '<=', $max_dup,
            "$what: $n commands repeated for executed ids (<= $max_dup)")
            or $why->($n);
    }
    $dup0 = $dups->();
};
my $turning = sub {
    my $s0 = $sum->($motors->());
    GiftTest::wait_until(10, sub { $sum->($motors->()) > $s0 }, 0.02);
};

# --------------------------------------------------------------- MQTT broker
GiftDispatch::js_publish_gifts($nats->url, $batch->(2000, 'mq'));
$turning->();
if ($st->{tb}) {
    # the RPCs in flight are lost with it: the dispatcher reconnects and
    # retries them, the motors skip the event ids they already executed
    $st->{tb}->kill9;
    $st->{tb}->start;
} else {
    $st->{mq}->restart;
}
ok(GiftTest::wait_until(15, sub {
    $d->log_text =~ /connection lost(?s:.*)MQTT: listening/
}), 'broker restarted: the dispatcher reconnected');
$settled->('broker restart', 4 * 64);

# --------------------------------------------------------------- NATS server
# Down for 6 s: longer than the ack wait (3 s), so the server redelivers
# what the dispatcher still holds (no InProgress could reach it), and
# longer than the lease's sending window (4 s), so the dispatcher fences
# itself: it stops sending, releases what waits in device queues, lets its
# RPCs in flight finish.  Gifts finish while it is down (their GiftAcks,
# and the completion markers sent with them, fail and are sent again), a
# stopping server may store a GiftAck and drop its marker, and late acks
# cross redeliveries.  Exactly once all the same: a redelivery of a held
# gift replaces its delivery, a redelivery of a finished one finds its
# completion marker or its stored GiftAck.
GiftDispatch::js_publish_gifts($nats->url, $batch->(2000, 'nats'));
$turning->();
my $rh = 'gift_dispatcher_gifts_redelivered_while_held_total';
my $held0 = $d->metric($rh) // 0;
my $log0 = length $d->log_text;
$nats->stop;
sleep 6;
$nats->start;
ok(GiftTest::wait_until(15, sub {
    my $l = $d->log_text;
    $l =~ /NATS: reconnected.*\(hot connection\)/
        && $l =~ /NATS: reconnected.*\(control connection\)/
}), 'NATS restarted: the dispatcher reconnected (both connections)');
$settled->('NATS restart', 0);
ok(GiftTest::alive($d->pid), 'the same dispatcher kept running');
like(substr($d->log_text, $log0), qr/no longer the active dispatcher(?s:.*)the active dispatcher again after \d+ ms: sending/,
    'NATS restart: the dispatcher fenced itself during the outage, then sent again');
# (how many depends on what InProgress reached the new server first)
diag 'NATS restart: ' . (($d->metric($rh) // 0) - $held0)
    . ' deliveries of gifts the dispatcher held';
# Every gift has its marker, those that finished as the server stopped too
# (their first marker was lost with it): what makes a later redelivery
# harmless.  A gift whose ack was held when the connection broke gets it
# when the server redelivers it, after the ack wait.
my @unmarked;
GiftTest::wait_until(15, sub {
    my %marked = map {
        $_->{subject} =~ /^\$KV\.GIFT_DONE\.(nats-\d+)$/ ? ($1 => 1) : ()
    } GiftDispatch::stream_messages($nats->url, 'KV_GIFT_DONE');
    @unmarked = grep { /^nats-/ && !$marked{$_} } @ids;
    !@unmarked;
}, 0.5);
is(scalar @unmarked, 0, 'NATS restart: every gift has its completion marker')
    or diag "no marker: @unmarked[0 .. ($#unmarked < 19 ? $#unmarked : 19)]";

# --------------------------------------------------------------- SIGKILL
GiftDispatch::js_publish_gifts($nats->url, $batch->(2000, 'kill'));
$turning->();
$d->stop('KILL', 5);
$d = GiftDispatch::start_dispatcher(%dconf);
$settled->('SIGKILL and restart', 4 * 64);
my $t = $tb->totals->{totals};
diag "motors: $t->{events} events, $t->{duplicates} repeated commands ignored,"
    . " $t->{rpcs} RPCs";

is($d->stop('TERM', 15), 0, 'SIGTERM: exit 0');

# --------------------------------------------------------------- flaky motors
# A third of the commands fail: gifts are retried (NakWithDelay) and those
# that fail all 5 deliveries are dead-lettered.  What the motors executed
# must be exactly what the ok GiftAcks say, device by device.
$tb = $st->restart_motors('--error-rate', '0.33', '--seed', '99');
$d = GiftDispatch::start_dispatcher(%dconf,
    extra_nats => 'retry_delays_ms = [ 20 ];',
    extra_devices => 'coalesce_max_events = 1;');
my @flaky = $batch->(300, 'flaky');
my %flaky = map { $_->{eventId} => 1 } @flaky;
GiftDispatch::js_publish_gifts($nats->url, @flaky);
my @fa;
ok(GiftTest::wait_until(40, sub {
    @fa = grep { $flaky{$_->{ack}{event_id}} } GiftDispatch::acks($nats->url);
    @fa >= 300;
}, 0.25), 'flaky motors: every gift got its GiftAck');
is(scalar @fa, 300, '... exactly one each');
my (%okr, $dead);
for (@fa) {
    if ($_->{ack}{status} eq 'ok') {
        $okr{$_->{ack}{device_id}} += $_->{ack}{rounds};
    } else {
        $dead++;
        is($_->{ack}{reason}, 'device_error', 'dead letter: device_error')
            unless $dead > 1;
        is($_->{ack}{attempts}, 5, '... after 5 attempts') unless $dead > 1;
    }
}
is_deeply($motors->(), \%okr,
    'motors executed exactly the rounds the ok GiftAcks report');
cmp_ok(scalar(grep { $_->{ack}{attempts} > 1 } @fa), '>', 0,
    'some gifts needed retries');
diag 'flaky: ' . (300 - ($dead // 0)) . ' ok, ' . ($dead // 0)
    . ' dead-lettered';
is($d->stop('TERM', 15), 0, 'SIGTERM: exit 0');
$st->stop;
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
done_testing();
