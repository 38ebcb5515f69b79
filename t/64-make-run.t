#!/usr/bin/perl
# make run (scripts/run.sh) keeps every part it starts in its own process
# group, in the foreground: nats-server, the ThingsBoard stand-in and its motors, the dispatcher,
# and nginx's master and workers share the script's group, and nothing is
# left once the group gets SIGINT (Ctrl-C).  Free ports (GIFT_*_PORT) and
# a state directory of its own (GIFT_RUN_DIR).  nginx, nats-server and the
# dispatcher run under SCHED_BATCH, the stand-ins under the default policy.

use strict;
use warnings;
use Test::More;
use POSIX qw(:sys_wait_h setsid);
use lib 't/lib';
use GiftTest;

# make run starts the plain build (build/), as a user runs it
plan skip_all => 'make run uses the plain build, not the sanitizer one'
    if $ENV{GIFT_SANITIZE};

my $root = GiftTest::root();
my $dir = GiftTest::tempdir();
my %port = map { $_ => GiftTest::free_port() }
    qw(HTTP NATS NATS_HTTP MQTT METRICS);
my $out = "$dir/run.out";

my $pgid = fork();
die "fork: $!" unless defined $pgid;
if ($pgid == 0) {
    setsid();           # as a terminal's job: its own group (and session)
    open(STDIN, '<', '/dev/null');
    open(STDOUT, '>', $out) or die "$out: $!";
    open(STDERR, '>&', \*STDOUT);
    $ENV{"GIFT_${_}_PORT"} = $port{$_} for keys %port;
    $ENV{GIFT_RUN_DIR} = "$dir/run";
    delete $ENV{GIFT_RUN_SCHED};        # make run's default
    exec("$root/scripts/run.sh") or die "exec: $!";
}
# whatever happens, nothing of the group outlives the test
END { kill 'KILL', -$pgid if $pgid && kill(0, -$pgid) }

ok(GiftTest::wait_until(180, sub {
    GiftTest::slurp($out) =~ /The gift pipeline is running/
        || waitpid($pgid, WNOHANG) == $pgid }, 0.2),
    'make run: the stack is up') or diag GiftTest::slurp($out);

# every process: pid => { pgid, ppid, cmd }
sub procs {
    my %p;
    for my $f (glob '/proc/[0-9]*/stat') {
        my $s = GiftTest::slurp($f) or next;
        my ($pid, $state, $ppid, $pg) = $s =~ /^(\d+) \(.*\) (\S) (\d+) (\d+)/
            or next;
        next if $state eq 'Z';
        (my $cmd = GiftTest::slurp("/proc/$pid/cmdline")) =~ s/\0/ /g;
        $p{$pid} = { pgid => $pg, ppid => $ppid, cmd => $cmd };
    }
    return \%p;
}

my $p = procs();
my @group = grep { $p->{$_}{pgid} == $pgid } keys %$p;
my %in = map { $_ => 1 } @group;
my @cmds = map { $p->{$_}{cmd} } @group;
for my $what ([ 'nats-server', qr/^nats-server .*-p $port{NATS}\b/ ],
              [ 'the ThingsBoard stand-in', qr{^node tools/tbstandin/tb\.mjs .*--port $port{MQTT}\b} ],
              [ 'the motors', qr{^node tools/tbstandin/motors\.mjs .*--port $port{MQTT}\b} ],
              [ 'gift-dispatcher', qr{build/gift-dispatcher -c \Q$dir\E/run/} ],
              [ 'the nginx master', qr{^nginx: master process .*\Q$dir\E/run/} ])
{
    my ($name, $re) = @$what;
    is(scalar(grep { $_ =~ $re } @cmds), 1, "$name in make run's group")
        or diag join("\n", @cmds);
}
my ($master) = grep { $p->{$_}{cmd} =~ /^nginx: master process/ } @group;
my @workers = grep { $master && $p->{$_}{ppid} == $master } keys %$p;
cmp_ok(scalar @workers, '>=', 1, 'nginx workers: ' . scalar @workers);
is(scalar(grep { !$in{$_} } @workers), 0, '... all in the group');

# the product runs under SCHED_BATCH (GIFT_RUN_SCHED, batch by default):
# woken up, it does not preempt what runs; the stand-ins keep the default
sub policy {                            # /proc/PID/stat field 41
    my ($pid) = @_;
    my $s = GiftTest::slurp("/proc/$pid/stat") or return -1;
    $s =~ s/^.*\) //s;
    return (split ' ', $s)[38];
}
my %pid_of = map {
    my $re = $_->[1];
    ($_->[0] => (grep { $p->{$_}{cmd} =~ $re } @group)[0]);
} [ 'nats-server', qr/^nats-server / ], [ 'gift-dispatcher', qr{build/gift-dispatcher } ],
  [ 'the ThingsBoard stand-in', qr{tbstandin/tb\.mjs} ], [ 'the motors', qr{tbstandin/motors\.mjs} ];
SKIP: {
    skip 'chrt --batch is unavailable here (make run said so)', 6
        if GiftTest::slurp($out) =~ /chrt --batch is unavailable here/;
    for my $name ('nats-server', 'gift-dispatcher') {
        is(policy($pid_of{$name}), 3, "$name: SCHED_BATCH");
    }
    is(policy($master), 3, 'the nginx master: SCHED_BATCH');
    is(scalar(grep { policy($_) != 3 } @workers), 0,
        'the nginx workers: SCHED_BATCH');
    for my $name ('the ThingsBoard stand-in', 'the motors') {
        is(policy($pid_of{$name}), 0, "$name: the default policy");
    }
}

# nothing of this run outside the group (a daemon would have left it)
my @outside = grep { !$in{$_} && $p->{$_}{cmd} =~ /\Q$dir\E\/run|--port $port{MQTT}\b/ }
    keys %$p;
is_deeply([map { $p->{$_}{cmd} } @outside], [],
    'no process of this run outside the group');

my ($st) = GiftTest::post_gift($port{HTTP}, GiftTest::gift());
is($st, 202, 'a gift through the stack: 202');

# the dispatcher runs the example rendered for simulated motors: per gift
# and per command 100,000 rounds, the pace unlimited, said explicitly;
# the example itself (for real motors) keeps finite limits
my $conf = GiftTest::slurp("$dir/run/gift-dispatcher.conf");
my $example = GiftTest::slurp("$root/dispatcher/gift-dispatcher.conf.example");
like($conf, qr/^\s*max_rounds = 100000;/m, 'make run: max_rounds 100000');
like($conf, qr/^\s*coalesce_max_rounds = 100000;/m,
    'make run: coalesce_max_rounds 100000');
like($conf, qr/^\s*rounds_per_minute = "unlimited";/m,
    'make run: rounds_per_minute "unlimited", explicitly');
like($example, qr/^\s*max_rounds = 10000;/m, 'the example: max_rounds 10000');
like($example, qr/^\s*coalesce_max_rounds = 1000;/m,
    'the example: coalesce_max_rounds 1000');
like($example, qr/^\s*rounds_per_minute = 6000;/m,
    'the example: rounds_per_minute 6000');

# Ctrl-C: SIGINT to the whole group
kill 'INT', -$pgid;
ok(GiftTest::wait_until(120, sub {
    my $q = procs();
    !grep { $q->{$_}{pgid} == $pgid } keys %$q;
}, 0.2), 'SIGINT to the group: every part of it has exited')
    or diag join("\n", map { $_->{cmd} } grep { $_->{pgid} == $pgid }
        values %{procs()});
is(waitpid($pgid, 0), $pgid, 'make run has exited');
like(GiftTest::slurp($out), qr/make run: stopping/, '... saying so');
undef $pgid;

done_testing();
