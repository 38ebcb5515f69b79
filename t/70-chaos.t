#!/usr/bin/perl
# The whole stack under a steady stream of gifts, with faults one after the
# other: the dispatcher killed -9 and restarted, nats-server killed -9 and
# restarted on the same store, ThingsBoard (the stand-in's endpoint) killed
# -9 and restarted on the same port 3 s later (GIFT_TB=tbsim: mosquitto
# stopped for 3 s under tbsim), nginx reloaded twice and a worker killed -9.  A sender posts like a real one (retrying
# anything but 202 with the same body).  Then, as a user would check:
#   - every gift that got a 202 is in GIFTS exactly once;
#   - what the motors executed equals exactly the rounds of those gifts;
#   - one acknowledgement per gift, and an SSE client that resumes with
#     Last-Event-ID has every one of them.

use strict;
use warnings;
use Test::More;
use POSIX ();
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftStream;
use GiftTB;

my $N = $ENV{GIFT_SOAK} ? 6000 : 800;        # gifts
my $RATE = $ENV{GIFT_SOAK} ? 150 : 60;        # per second

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
GiftTest::giftctl($nats->url, 'setup');
# ThingsBoard: the stand-in and its motors (GIFT_TB=tbsim: tbsim on mosquitto)
my ($mq, $tbep, $tb, $mqtt_port, $mqtt_conf);
if (GiftTB::available() && ($ENV{GIFT_TB} // '') ne 'tbsim') {
    $tbep = GiftTB::start_tb(dir => $dir, motors => 8, dispatchers => 1);
    $tb = GiftTB::start_motors(dir => $dir, port => $tbep->port, motors => 8);
    ($mqtt_port, $mqtt_conf) = ($tbep->port, $tbep->mqtt_conf(1));
} else {
    $mq = GiftDispatch::start_mosquitto(dir => $dir);
    $tb = GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port);
    ($mqtt_port, $mqtt_conf) = ($mq->port, '');
}
my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "G$_"; device = "motor_0$_"; })
} 1 .. 4) . "\n    );\n";
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $mqtt_port,
    extra_mqtt => $mqtt_conf, rules => $rules);
my $d = GiftDispatch::start_dispatcher(%dconf);
# the SSE client is away from the reload to the end: the replay ring holds
# every acknowledgement, or its resume would get a gap (soak: 6,000)
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    http => 'gift_sse_replay_max ' . ($N + 100) . ';',
    server => 'location = /gift/events { gift_sse; }',
);
ok(GiftTest::wait_until(10, sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/g;
    @n >= 2;
}), 'stack up');

my $sse = GiftStream::SSE->new(port => $ngx->port);
my %seen;       # eventId => count, over the SSE client's whole life
my $last_id = 0;
my $read_sse = sub {
    my ($c) = @_;
    for my $e ($c->poll) {
        next unless $e->{event} eq 'ack';
        $seen{$e->{json}{eventId}}++;
        $last_id = $e->{id};
    }
};

# --- the sender: one child, paced, retrying until 202
my $log = "$dir/sender.log";
my $sender = fork();
die "fork: $!" unless defined $sender;
if ($sender == 0) {
    my $http = HTTP::Tiny->new(timeout => 3, keep_alive => 1);
    open(my $out, '>', $log) or POSIX::_exit(1);
    $out->autoflush(1);
    my $t0 = time;
    for my $i (1 .. $N) {
        my $due = $t0 + $i / $RATE;
        my $now = time;
        sleep($due - $now) if $due > $now;
        my $g = $GiftTest::JSON->encode({
            event => 'gift', platform => 'tiktok', userId => "u$i",
            giftName => 'G' . ($i % 4 + 1), diamond => $i % 5 + 1,
            quantity => 1 + $i % 3, eventId => "chaos-$i",
        });
        my ($st, $tries) = (0, 0);
        while ($st != 202 && $tries < 200) {
            $tries++;
            my $r = $http->request('POST',
                'http://127.0.0.1:' . $ngx->port . '/gift',
                { content => $g,
                  headers => { 'Content-Type' => 'application/json' } });
            $st = $r->{status};
            sleep 0.05 unless $st == 202;
        }
        print $out "chaos-$i $st $tries\n";
    }
    POSIX::_exit(0);
}

my $step = sub {
    my ($at, $what, $code) = @_;
    my $t0 = $^T;
    while (time < $at) {
        $read_sse->($sse) if $sse;
        sleep 0.05;
    }
    note("fault: $what");
    $code->();
};
my $start = time;

$step->($start + 2, 'kill -9 the dispatcher, restart it', sub {
    $d->stop('KILL');
    sleep 0.3;
    $d = GiftDispatch::start_dispatcher(%dconf);
});
$step->($start + 4, 'kill -9 nats-server, restart on the same store', sub {
    $nats->kill9;
    sleep 1;
    $nats->start;
});
if ($tbep) {
    # the RPCs in flight are lost with it: the dispatcher reconnects and
    # retries them, the motors skip the event ids they already executed
    $step->($start + 7, 'kill -9 the ThingsBoard stand-in, restart it 3 s later on the same port', sub {
        $tbep->kill9;
        sleep 3;
        $tbep->start;
    });
} else {
    $step->($start + 7, 'stop mosquitto for 3 s', sub {
        $mq->stop;
        sleep 3;
        $mq->start;
    });
}
$step->($start + 11, 'nginx reload twice, kill -9 a worker', sub {
    $sse->close;            # the reload ends it anyway; resume later
    $sse = undef;
    $ngx->reload;
    sleep 0.5;
    $ngx->reload;
    my ($w) = $ngx->workers;
    kill 'KILL', $w;
});

waitpid($sender, 0);
my @lines = split /\n/, GiftTest::slurp($log);
is(scalar(@lines), $N, "the sender finished its $N gifts");
my @not = grep { !/ 202 \d+$/ } @lines;
is(scalar(@not), 0, 'every gift got its 202 in the end (retrying)')
    or diag explain [@not[0 .. 4]];
diag('gifts that needed retries: ' . scalar(grep { !/ 202 1$/ } @lines));

# every 202'd gift stored exactly once
my $info;
ok(GiftTest::wait_until(30, sub {
    $info = GiftTest::stream_info($nats->url);
    ($info->{GIFTS}{messages} // 0) >= $N && ($info->{lag} // 1) == 0
        && ($info->{ack_pending} // 1) == 0;
}, 0.5), 'the dispatcher drained the stream') or diag explain $info;
is($info->{GIFTS}{messages}, $N, "GIFTS holds exactly $N gifts");
my %ids;
$ids{$_->{event}{eventId}}++ for GiftTest::stored_range($nats->url, 'GIFTS',
    1, $info->{GIFTS}{last_seq});
is(scalar(keys %ids), $N, 'each gift once') ;
is(scalar(grep { $_ != 1 } values %ids), 0, 'no gift twice');

# what the motors did
my %want;
for my $i (1 .. $N) {
    $want{'motor_0' . ($i % 4 + 1)} += ($i % 5 + 1) * (1 + $i % 3);
}
my $got;
ok(GiftTest::wait_until(20, sub {
    $got = $tb->rounds;
    join(',', map { $got->{$_} // 0 } sort keys %want)
        eq join(',', map { $want{$_} } sort keys %want);
}, 0.5), "the motors turned exactly the rounds of the 202'd gifts")
    or diag explain { want => \%want, got => $got };
# commands repeated for executed event ids: only where a command and its
# answer were cut apart (the dispatcher's kill -9, mosquitto's stop), at
# most two commands of 64 gifts per motor (4 motors) for each
my $dups = $tb->totals->{totals}{duplicates};
cmp_ok($dups, '<=', 2 * 2 * 64 * 4,
    "commands repeated for executed ids ($dups) within the in-flight bound");

# the dispatcher came back to the restarted endpoint
if ($tbep) {
    my $dt = $tbep->totals->{devices}{'gift-dispatcher-1'};
    ok($dt->{connects} >= 1 && $dt->{connected},
        'the dispatcher reconnected to the restarted stand-in')
        or diag explain $dt;
    my $mt = $tb->totals->{devices};
    is(scalar(grep { $mt->{$_}{connects} >= 2 } keys %$mt), scalar(keys %$mt),
        'so did every motor') or diag explain $mt;
}

# one acknowledgement per gift
ok(GiftTest::wait_until(20, sub {
    (GiftTest::stream_info($nats->url)->{GIFT_ACKS}{messages} // 0) >= $N
}, 0.5), 'GIFT_ACKS has an acknowledgement per gift');
is(GiftTest::stream_info($nats->url)->{GIFT_ACKS}{messages}, $N,
    'and no more');

# the SSE client resumes where it stopped and ends up with every ack
my $r = GiftStream::SSE->new(port => $ngx->port,
    headers => { 'Last-Event-ID' => $last_id });
GiftTest::wait_until(15, sub { $read_sse->($r); keys(%seen) >= $N }, 0.1);
is(scalar(keys %seen), $N, 'the resumed SSE client saw every gift');
is(scalar(grep { $_ != 1 } values %seen), 0, 'each acknowledgement once');

$r->close;
$d->stop;
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([grep { !/worker process \d+ exited on signal 9/ }
    $ngx->bad_log_lines], [], 'no [alert] or [emerg] but the killed worker');
done_testing();
