#!/usr/bin/perl
# gift_nats_url names one server of a cluster: the worker learns the others
# from the server's INFO ("connect_urls"), as the NATS clients do, and moves
# to one of them when its server goes away, and back again.  (Two plain
# nats-server nodes with routes; no JetStream is needed to see where the
# worker is connected.)

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftFaults;

my $dir = GiftTest::tempdir();
my @ports = map { GiftTest::free_port() } 1 .. 2;
my @cports = map { GiftTest::free_port() } 1 .. 2;
my @nodes;
for my $i (0, 1) {
    my $other = $cports[1 - $i];
    GiftTest::make_path("$dir/n$i");
    GiftTest::spurt("$dir/n$i.conf", <<"EOF");
server_name: n$i
listen: 127.0.0.1:$ports[$i]
cluster {
  name: gift
  listen: 127.0.0.1:$cports[$i]
  routes: [ nats://127.0.0.1:$other ]
}
EOF
    push @nodes, GiftTest::Nats->new(dir => "$dir/n$i", port => $ports[$i],
        conf => "$dir/n$i.conf");
}
$_->start for @nodes;

my $ngx = GiftTest::start_nginx(nats_url => "nats://127.0.0.1:$ports[0]",
    workers => 1, log_level => 'info');
my $log = sub { GiftTest::slurp($ngx->error_log) };
ok(GiftTest::wait_until(10, sub { $log->() =~
    /connected to NATS 127\.0\.0\.1:$ports[0]/ }), 'connected to node 0');
ok(GiftTest::wait_until(10, sub { $log->() =~
    /NATS server 127\.0\.0\.1:$ports[1] learned from the cluster/ }),
    'node 1 learned from the cluster');

$nodes[0]->stop;
ok(GiftTest::wait_until(10, sub { $log->() =~
    /connected to NATS 127\.0\.0\.1:$ports[1]/ }),
    'node 0 stopped: the worker moved to node 1');

my $routes = sub { scalar(() = GiftTest::slurp($nodes[0]->log)
    =~ /Route connection created/g) };
my $routes0 = $routes->();
$nodes[0]->start;
ok(GiftTest::wait_until(30, sub { $routes->() > $routes0 }),
    'node 0 back in the cluster (its route to node 1)');
my $off = length $log->();
$nodes[1]->stop;
ok(GiftTest::wait_until(15, sub { substr($log->(), $off) =~
    /connected to NATS 127\.0\.0\.1:$ports[0]/ }),
    'node 1 stopped: back on node 0');

is(() = $log->() =~ /learned from the cluster/g, 1,
    'each server learned once');
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
$_->stop for @nodes;
done_testing();
