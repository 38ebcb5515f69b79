#!/usr/bin/perl
# Faults in the middle of a stream of webhook gifts, with real processes.
# After each, what tbsim's motors executed equals exactly the sum of every
# gift the webhook answered 202 (not duplicate), device by device, each
# gift executed once, and GIFT_ACKS holds one GiftAck per gift:
#  - two dispatchers sharing the consumer, both active (nats.lease_ms = 0:
#    no owner lease; t/66 tests the default, one active owner), own MQTT
#    client ids, distinct RPC id tags leased in KV: both work, and no gift
#    is handled by both;
#  - mosquitto stopped and started while gifts flow;
#  - the dispatcher killed with SIGKILL mid-stream, then restarted: what
#    it held comes back after the ack wait (t/27 makes the crash land
#    exactly between a device's answer and the ack).

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use POSIX ();
use lib 't/lib';
use GiftTest;
use GiftDispatch;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
# The direct-broker mode's test (tbsim on mosquitto, not the ThingsBoard
# stand-in): dispatchers seeing each other's replies on a shared topic
# happens only on a plain broker.
my $mq = GiftDispatch::start_mosquitto(dir => $dir);
my $tb = GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port,
    args => [ '--latency-ms', '2-6' ]);

my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "G$_"; device = "motor_0$_"; })
} 1 .. 8) . "\n    );\n";
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $mq->port,
    rules => $rules, rpc_timeout_ms => 1000,
    extra_nats => 'ack_wait_ms = 3000; publish_timeout_ms = 1000; '
        . 'publish_retry_ms = 200; retry_delays_ms = [ 200 ]; lease_ms = 0;',
    extra_devices => 'coalesce_max_events = 16;');
# no instance_id: each leases an RPC id tag no other live one holds
my $da = GiftDispatch::start_dispatcher(%dconf,
    extra_mqtt => 'client_id = "gift-dispatcher-a";');
my $db = GiftDispatch::start_dispatcher(%dconf,
    extra_mqtt => 'client_id = "gift-dispatcher-b";');
my ($tag_a) = $da->log_text =~ /instance tag (\d+) \(leased/;
my ($tag_b) = $db->log_text =~ /instance tag (\d+) \(leased/;
ok(defined $tag_a && defined $tag_b && $tag_a != $tag_b,
    'two dispatchers leased distinct RPC id tags (' . ($tag_a // '?') . ', '
    . ($tag_b // '?') . ')');
my $ngx = GiftTest::start_nginx(dir => "$dir/nginx", nats_url => $nats->url);
GiftTest::wait_until(10, sub {
    () = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
});

srand(11);
my (%want, %accepted);
my $motors = sub {
    my $t = $tb->totals->{devices};
    return { map { $_ => $t->{$_}{rounds} } keys %$t };
};
my $sum = sub { my $s = 0; $s += $_ for values %{$_[0]}; $s };

# Post $n gifts over 6 connections from a child process; returns a sub
# that waits for it and books every 202 (not duplicate) into %want.
sub stream {
    my ($n, $tag) = @_;
    my (@g, %rounds);
    for my $i (1 .. $n) {
        my $k = 1 + int(rand(8));
        my $g = GiftTest::gift(giftName => "G$k",
            diamond => 1 + int(rand(9)), quantity => 1 + int(rand(3)),
            eventId => "$tag-$i");
        $rounds{$g->{eventId}} = [ "motor_0$k", $g->{diamond} * $g->{quantity} ];
        push @g, $g;
    }
    my $file = "$dir/stream-$tag";
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        my @r = GiftTest::post_many($ngx->port, 6, @g);
        open(my $o, '>', $file) or POSIX::_exit(1);
        print $o join("\t", @$_[0, 1], ($_->[2] // '') =~ /"duplicate":true/
            ? 1 : 0), "\n" for @r;
        close $o;
        POSIX::_exit(0);
    }
    return sub {
        waitpid($pid, 0);
        my $ok = 0;
        for (split /\n/, GiftTest::slurp($file)) {
            my ($id, $st, $dup) = split /\t/;
            next unless $st == 202 && !$dup;
            $accepted{$id} = 1;
            $want{$rounds{$id}[0]} += $rounds{$id}[1];
            $ok++;
        }
        return $ok;
    };
}

sub settled {
    my ($what) = @_;
    ok(GiftTest::wait_until(40, sub {
        $sum->($motors->()) >= $sum->(\%want)
    }, 0.2), "$what: the motors finished");
    is_deeply($motors->(), \%want,
        "$what: per-device rounds = the sum of the 202'd gifts");
    my $t = $tb->totals->{totals};
    is($t->{events}, scalar(keys %accepted),
        "$what: each gift executed once ($t->{events})");
    my @acks;
    GiftTest::wait_until(20, sub {
        @acks = GiftDispatch::acks($nats->url);
        @acks >= keys %accepted;
    }, 0.2);
    my %seen;
    $seen{$_->{ack}{event_id}}++ for @acks;
    is(scalar @acks, scalar(keys %accepted), "$what: one GiftAck per gift");
    is(scalar(grep { !$seen{$_} } keys %accepted), 0, "$what: none missing");
    is(scalar(grep { $_->{ack}{status} ne 'ok' } @acks), 0,
        "$what: all status ok");
}

# --------------------------------------------------------------- two at once
my $wait = stream(1000, 'two');
my $n = $wait->();
cmp_ok($n, '>=', 990, "two dispatchers: $n gifts accepted");
settled('two dispatchers');
is($tb->totals->{totals}{duplicates}, 0,
    'no gift was handled by both (no command repeated)');
my ($pa, $pb) = map {
    $_->metric('gift_dispatcher_gifts_pulled_total') // 0
} $da, $db;
cmp_ok($pa, '>', 0, "dispatcher A pulled $pa");
cmp_ok($pb, '>', 0, "dispatcher B pulled $pb");
is($pa + $pb, $n, '... together each gift exactly once');
my ($ra, $rb) = map {
    $_->metric('gift_dispatcher_replies_unknown_total') // 0 } $da, $db;
cmp_ok($ra, '>', 0, 'each sees the other\'s replies on the shared topic '
    . '(ignored by id)');

# --------------------------------------------------------------- broker restart
# Where the design relies on the motors' event-id window (a reply or a
# dispatcher lost between a command and its answer), the commands repeated
# for executed ids stay within what was in flight: two commands of 16 gifts
# per device (the one in flight, the one answered whose marker had not left
# yet), 8 devices, 2 dispatchers.
my $dup_bound = 2 * 16 * 8 * 2;
my $dup0 = $tb->totals->{totals}{duplicates};
$wait = stream(1000, 'mq');
GiftTest::wait_until(10, sub { $sum->($motors->()) > $sum->(\%want) }, 0.05);
my @off = map { length $_->log_text } $da, $db;
$mq->stop;
# both dispatchers noticed the broker had gone before it comes back
ok(GiftTest::wait_until(30, sub {
    substr($da->log_text, $off[0]) =~ /connection lost/
        && substr($db->log_text, $off[1]) =~ /connection lost/ }),
    'mosquitto stopped: both dispatchers lost it');
$mq->start;
$n = $wait->();
ok(GiftTest::wait_until(15, sub {
    $da->log_text =~ /connection lost(?s:.*)MQTT: listening/
        && $db->log_text =~ /connection lost(?s:.*)MQTT: listening/
}), 'mosquitto stopped and started: both dispatchers reconnected');
settled('mosquitto restart');
{
    my $n = $tb->totals->{totals}{duplicates} - $dup0;
    cmp_ok($n, '<=', $dup_bound,
        "mosquitto restart: $n commands repeated for executed ids");
    $dup0 += $n;
}

# --------------------------------------------------------------- SIGKILL
is($db->stop('TERM', 15), 0, 'dispatcher B stopped (SIGTERM, exit 0)');
# slow motors: the stream (about 10,000 rounds) takes seconds, so the kill
# lands while plenty is held, in RPCs and publishing, however fast or slow
# the machine; the motors speed up again for the redeliveries
$tb->control('latency 200-400');
$wait = stream(1000, 'kill');
my $s0 = $sum->($motors->());
GiftTest::wait_until(20, sub { $sum->($motors->()) > $s0 + 300 }, 0.02);
$da->stop('KILL', 5);
$tb->control('latency 2-6');
$da = GiftDispatch::start_dispatcher(%dconf,
    extra_mqtt => 'client_id = "gift-dispatcher-a";');
$n = $wait->();
settled('SIGKILL mid-stream and restart');
my $hits = $da->metric('gift_dispatcher_done_hits_total') // 0;
my $checks = $da->metric('gift_dispatcher_done_checks_total') // 0;
cmp_ok($checks, '>', 0, "the restarted dispatcher looked redeliveries up "
    . "in GIFT_DONE ($checks)");
diag "redeliveries found done (acked without a command): $hits; commands "
    . "repeated and ignored by the motors: "
    . $tb->totals->{totals}{duplicates};
cmp_ok($tb->totals->{totals}{duplicates} - $dup0, '<=', $dup_bound,
    'SIGKILL: commands repeated for executed ids within the in-flight bound');

is($da->stop('TERM', 15), 0, 'SIGTERM: exit 0');
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
$ngx->stop;
done_testing();
