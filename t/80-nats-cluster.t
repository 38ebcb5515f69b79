#!/usr/bin/perl
# Scale out on NATS (make soak): a three-node NATS cluster on loopback,
# streams with 3 replicas, two nginx instances and two dispatchers.  Under a
# steady stream of gifts, one NATS node is killed -9: nothing that got a 202
# is lost, the only 5xx answers are 503s, and the motors turn exactly once
# per gift.  ThingsBoard: the stand-in and its motors, one dispatcher device
# per dispatcher (GIFT_TB=tbsim: tbsim on mosquitto).

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
    $tbep = GiftTB::start_tb(dir => $dir, motors => 8, dispatchers => 2);
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
for my $k (1 .. 2) {
    my $conf = GiftDispatch::dispatcher_conf(dir => $dir,
        nats_url => "nats://127.0.0.1:$ports[0]", mqtt_port => $mqtt_port,
        rules => $rules, metrics_port => GiftTest::free_port(),
        log_level => 'info', shutdown_timeout_ms => 10000,
        rpc_timeout_ms => 3000, extra_nats => '',
        extra_mqtt => $tbep ? $tbep->mqtt_conf($k) : '',
        extra_devices => '');
    my $list = join(', ', map { qq("nats://127.0.0.1:$_") } @ports);
    $conf =~ s/\burl = "[^"]*";/urls = [ $list ];/;
    push @disp, GiftDispatch::start_dispatcher(dir => $dir,
        conf_text => $conf);
}
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
ok(GiftTest::wait_until(60, sub {
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

$_->stop for @disp;
for my $n (@ngx) {
    is($n->stop, 0, 'nginx exits cleanly');
    is_deeply([$n->bad_log_lines], [], 'no [alert] or [emerg]');
}
done_testing();
