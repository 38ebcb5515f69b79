#!/usr/bin/perl
# Scale out on NATS (make soak): a three-node NATS cluster on loopback,
# streams with 3 replicas, two nginx instances and three dispatchers (one
# owner, two standbys).  Under a steady stream of gifts, one NATS node is
# killed -9, then the owning dispatcher is killed -9 and another dispatcher
# added: nothing that got a 202 is lost, the only 5xx answers are 503s, the
# motors turn exactly once per gift, every gift has one GiftAck, no two
# commands to one motor were in flight together and no 59-second window
# went above a device's limit (read from the GiftAcks' command times, and
# from tbsim's records with it), and the takeover time is reported.
# ThingsBoard: the stand-in and its motors, one dispatcher device per
# dispatcher (GIFT_TB=tbsim: tbsim on mosquitto).

use strict;
use warnings;
use Test::More;
use POSIX ();
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

plan skip_all => 'the NATS cluster scenario runs in make soak (GIFT_SOAK=1)'
    unless $ENV{GIFT_SOAK};

my $N = 3000;
my $RATE = 150;
my $dir = GiftTest::tempdir();

# --- three nats-server nodes with routes
my @ports = map { GiftTest::free_port() } 1 .. 3;
my @cports = map { GiftTest::free_port() } 1 .. 3;
my @nodes;
for my $i (0 .. 2) {
    my $routes = join(', ', map { "nats://127.0.0.1:$cports[$_]" }
        grep { $_ != $i } 0 .. 2);
    GiftTest::make_path("$dir/n$i");
    GiftTest::spurt("$dir/n$i.conf", <<"EOF2");
server_name: n$i
listen: 127.0.0.1:$ports[$i]
jetstream { store_dir: "$dir/n$i" }
cluster {
  name: gift
  listen: 127.0.0.1:$cports[$i]
  routes: [ $routes ]
}
EOF2
    push @nodes, GiftTest::Nats->new(dir => "$dir/n$i", port => $ports[$i],
        conf => "$dir/n$i.conf");
}
$_->start for @nodes;
my $urls = join(',', map { "nats://127.0.0.1:$_" } @ports);

my ($out, $rc);
ok(GiftTest::wait_until(60, sub {
    ($out, $rc) = GiftTest::giftctl($urls, 'setup', '--replicas', 3);
    $rc == 0;
}, 1), 'giftctl setup --replicas 3 on the cluster') or diag $out;

# --- two dispatchers, two nginx, all knowing every node
my ($mq, $tbep, $tb, $mqtt_port);
if (GiftTB::available() && ($ENV{GIFT_TB} // '') ne 'tbsim') {
    $tbep = GiftTB::start_tb(dir => $dir, motors => 8, dispatchers => 4);
    $tb = GiftTB::start_motors(dir => $dir, port => $tbep->port, motors => 8);
    $mqtt_port = $tbep->port;
} else {
    $mq = GiftDispatch::start_mosquitto(dir => $dir);
    $tb = GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port);
    $mqtt_port = $mq->port;
}
my $rules = "    rule = (\n" . join(",\n", map {
    qq(        { gift = "G$_"; device = "motor_0$_"; })
} 1 .. 4) . "\n    );\n";
my @disp;
my $LIMIT = 6000;                   # rounds per minute per motor
my $add_dispatcher = sub {
    my $k = @disp + 1;
    my $mport = GiftTest::free_port();
    my $conf = GiftDispatch::dispatcher_conf(dir => $dir,
        nats_url => "nats://127.0.0.1:$ports[0]", mqtt_port => $mqtt_port,
        rules => $rules, metrics_port => $mport,
        log_level => 'info', shutdown_timeout_ms => 10000,
        rpc_timeout_ms => 3000, extra_nats => 'replicas = 3;',
        extra_mqtt => $tbep ? $tbep->mqtt_conf($k) : '',
        extra_devices => "rounds_per_minute = $LIMIT;");
    my $list = join(', ', map { qq("nats://127.0.0.1:$_") } @ports);
    $conf =~ s/\burl = "[^"]*";/urls = [ $list ];/;
    push @disp, GiftDispatch::start_dispatcher(dir => $dir,
        conf_text => $conf, metrics_port => $mport);
};
$add_dispatcher->() for 1 .. 3;
my $owner = sub {
    my @own;
    GiftTest::wait_until(60, sub {
        @own = grep { $disp[$_]{pid}
            && ($disp[$_]->metric('gift_dispatcher_active') // 0) == 1 }
            0 .. $#disp;
        @own == 1;
    }, 0.2);
    return @own == 1 ? $own[0] : undef;
};
is($owner->(), 0, 'three dispatchers: the first owns, two stand by');
my $gurls = join(' ', map { "nats://127.0.0.1:$_" } @ports);
my @ngx = map { GiftTest::start_nginx(nats_url => $gurls) } 1 .. 2;
ok(GiftTest::wait_until(20, sub {
    !grep { my @n = GiftTest::slurp($_->error_log) =~ /connected to NATS/g;
            @n < 2 } @ngx;
}), 'both nginx instances connected');

# --- the sender: alternating between the two nginx, retrying until 202
my $log = "$dir/sender.log";
my $sender = fork();
die "fork: $!" unless defined $sender;
if ($sender == 0) {
    my @h = map { HTTP::Tiny->new(timeout => 5, keep_alive => 1) } 1 .. 2;
    open(my $fh, '>', $log) or POSIX::_exit(1);
    $fh->autoflush(1);
    my $t0 = time;
    for my $i (1 .. $N) {
        my $due = $t0 + $i / $RATE;
        sleep($due - time) if $due > time;
        my $body = $GiftTest::JSON->encode({ event => 'gift',
            platform => 'tiktok', userId => "u$i", giftName => 'G'
            . ($i % 4 + 1), diamond => 1 + $i % 3, quantity => 1,
            eventId => "cl-$i" });
        my (@codes, $st);
        for my $try (1 .. 300) {
            my $k = ($i + $try) % 2;
            my $r = $h[$k]->request('POST', $ngx[$k]->url('/gift'),
                { content => $body,
                  headers => { 'Content-Type' => 'application/json' } });
            $st = $r->{status};
            push @codes, $st;
            last if $st == 202;
            sleep 0.05;
        }
        print $fh "cl-$i $st @codes\n";
    }
    POSIX::_exit(0);
}

sleep 5;
# kill the node the first nginx's workers are not necessarily on: node 0
note('kill -9 one NATS node');
$nodes[0]->kill9;
sleep 8;
$nodes[0]->start;

# the owning dispatcher killed -9 under load, and another one added
my $o = $owner->();
ok(defined $o, 'one dispatcher owns after the node came back');
note("kill -9 the owning dispatcher " . ($o // '?'));
my $tkill = time;
$disp[$o]->stop('KILL', 5) if defined $o;
$add_dispatcher->();
my $n = $owner->();
ok(defined $n && $n != ($o // -1), 'another dispatcher owns ('
    . ($n // '?') . ')');
my $tk = defined $n ? $disp[$n]->metric('gift_dispatcher_takeover_seconds')
                    : undef;
ok(defined $tk, 'the takeover time is in its /metrics');
diag sprintf('takeover after kill -9 of the owner: %s s without an owner '
    . '(seen active %.1f s after the kill)', $tk // '?', time - $tkill);

waitpid($sender, 0);
my @lines = split /\n/, GiftTest::slurp($log);
is(scalar(@lines), $N, "$N gifts sent");
is(scalar(grep { !/^\S+ 202 / } @lines), 0, 'every gift got a 202 in the end');
my %codes;
for (@lines) {
    my (undef, undef, @c) = split ' ';
    $codes{$_}++ for @c;
}
diag('answers seen: ' . join(', ', map { "$_ x$codes{$_}" } sort keys %codes));
is(scalar(grep { /^5/ && $_ != 503 } keys %codes), 0,
    'the only 5xx answers are 503s');

my $info;
ok(GiftTest::wait_until(180, sub {
    $info = GiftTest::stream_info($urls);
    ($info->{GIFTS}{messages} // 0) >= $N && ($info->{lag} // 1) == 0
        && ($info->{ack_pending} // 1) == 0;
}, 1), 'the dispatchers drained GIFTS') or diag explain $info;
is($info->{GIFTS}{messages}, $N, "GIFTS holds exactly $N gifts");
my %ids;
$ids{$_->{event}{eventId}}++ for GiftTest::stored_range($urls, 'GIFTS', 1,
    $info->{GIFTS}{last_seq});
is(scalar(keys %ids), $N, 'nothing 202\'d is lost');

my %want;
$want{'motor_0' . ($_ % 4 + 1)} += 1 + $_ % 3 for 1 .. $N;
my $got;
ok(GiftTest::wait_until(30, sub {
    $got = $tb->rounds;
    !grep { ($got->{$_} // 0) != $want{$_} } keys %want;
}, 1), 'the motors turned exactly once per gift')
    or diag explain { want => \%want, got => $got };
my @acks;
GiftTest::wait_until(60, sub {
    @acks = grep { $_->{ack}{event_id} =~ /^cl-/ }
        GiftDispatch::acks("nats://127.0.0.1:$ports[1]");
    @acks >= $N;
}, 1);
my %na;
$na{$_->{ack}{event_id}}++ for @acks;
is(scalar(keys %na), $N, 'every gift has its GiftAck');
is(scalar(grep { $_ > 1 } values %na), 0, '... exactly one');
# commands as the GiftAcks tell (all GiftAcks of one command carry its
# completed_at_ms and rpc_latency_us): [start, end, rounds] per device
my %cmd;
for (@acks) {
    my $k = $_->{ack};
    next unless $k->{rpc_latency_us};
    my $c = $cmd{$k->{device_id}}{"$k->{completed_at_ms}/$k->{rpc_latency_us}"}
        //= [ $k->{completed_at_ms} - $k->{rpc_latency_us} / 1000,
              $k->{completed_at_ms}, 0 ];
    $c->[2] += $k->{rounds};
}
my ($overlap, %most) = (0);
for my $dev (keys %cmd) {
    my @iv = sort { $a->[0] <=> $b->[0] } values %{$cmd{$dev}};
    my ($j, $sum) = (0, 0);
    for my $i (0 .. $#iv) {
        $overlap++ if $i > 0 && $iv[$i][0] < $iv[$i - 1][1] - 2;
        $sum += $iv[$i][2];
        $sum -= $iv[$j++][2] while $iv[$j][0] <= $iv[$i][0] - 59000;
        $most{$dev} = $sum if $sum > ($most{$dev} // 0);
    }
}
is($overlap, 0, 'no two commands to one motor in flight together (GiftAcks)');
is(scalar(grep { $most{$_} > $LIMIT } keys %most), 0,
    "no 59-second window above $LIMIT rounds (GiftAcks)");
diag('most rounds in 59 s: ' . join(', ', map { "$_ $most{$_}" }
    sort keys %most));
if ($mq) {
    my $mt = $tb->totals->{devices};
    is(scalar(grep { $mt->{$_}{max_pending} > 1 } keys %$mt), 0,
        'tbsim: never two commands in flight to a motor');
    is(scalar(grep { $mt->{$_}{max_minute_rounds} > $LIMIT } keys %$mt), 0,
        "tbsim: no 59-second window above $LIMIT rounds");
}

$_->stop for grep { $_->{pid} } @disp;
for my $n (@ngx) {
    is($n->stop, 0, 'nginx exits cleanly');
    is_deeply([$n->bad_log_lines], [], 'no [alert] or [emerg]');
}
done_testing();
