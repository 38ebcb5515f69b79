#!/usr/bin/perl
# The event loop never waits for NATS.  With one worker, while cnats is
# reconnecting, a plain static location on that worker answers as fast as
# before, and the webhook answers 503 unavailable at once:
#   A. nats-server stopped: each reconnect attempt is refused;
#   B. a "tarpit" on the NATS port that accepts connections and never
#      speaks: each attempt waits for the server's INFO until cnats' connect
#      timeout (2s), holding the connection's lock all that time, so any
#      cnats call on the loop that takes it would stall for seconds.
# What is checked is an order of events, not a duration: during B, the
# answers come while the worker's connection attempt is still pending (a
# tarpit connection it opened and has not yet given up on).  A loop that
# waits for NATS answers only once the attempt is over: a mutant that asked
# cnats for the connection status on the loop (natsConnection_Status takes
# that lock) answered nothing while an attempt was pending.

use strict;
use warnings;
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(sleep time);
use lib 't/lib';
use GiftTest;
use GiftFaults;

my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

my $ngx = GiftTest::start_nginx(nats_url => $nats->url, workers => 1);
my ($w) = GiftFaults::workers_ready($ngx);
ok($w, 'one worker, connected to NATS') or BAIL_OUT('no worker');

# one keep-alive connection each, to the one worker, TCP_NODELAY
my $hs = GiftFaults::Http->new($ngx->port);
my $hp = GiftFaults::Http->new($ngx->port);

# Alternating GET /static and POST /gift, $n of each at least, and until
# $more->() is false (at most 120 s).  $open->() (optional) returns the
# pending connection attempts (tarpit connections still open): a request
# sent and answered while one of them stayed open counts as "during".
sub measure {
    my ($n, $more, $open) = @_;
    my (@get, @post, %get_st, %post_st);
    my ($during, $pending) = (0, 0);
    my $end = time + 120;
    while ((@get < $n || ($more && $more->())) && time < $end) {
        my %before = map { $_ => 1 } $open ? $open->() : ();
        my $t0 = time;
        my $r = $hs->request('GET', '/static');
        push @get, time - $t0;
        $get_st{$r->{status}}++;
        $t0 = time;
        $r = $hp->post_json('/gift', $GiftTest::JSON->encode(GiftTest::gift()));
        push @post, time - $t0;
        my $b = eval { $GiftTest::JSON->decode($r->{content}) } // {};
        $post_st{$r->{status} . ($b->{error} ? " $b->{error}" : '')}++;
        if (%before) {
            $pending++;
            $during++ if grep { $before{$_} } $open->();
        }
        sleep 0.005;            # pacing, not synchronisation
    }
    return { get => \@get, post => \@post, get_st => \%get_st,
        post_st => \%post_st, during => $during, pending => $pending };
}

sub summary {
    my ($name, $m) = @_;
    my @g = @{$m->{get}};
    my @p = @{$m->{post}};
    my $ms = sub { 1000 * GiftFaults::percentile(@_) };
    diag sprintf('%-9s GET /static n=%d p50 %.2f ms max %.2f ms; '
        . 'POST /gift p50 %.2f ms max %.2f ms; %s', $name, scalar @g,
        $ms->(50, @g), $ms->(100, @g), $ms->(50, @p), $ms->(100, @p),
        join(', ', map { "$_: $m->{post_st}{$_}" }
            sort keys %{$m->{post_st}}));
}

my $base = measure(100);
summary('baseline', $base);
is_deeply($base->{post_st}, { 202 => scalar @{$base->{post}} },
    'baseline: gifts accepted');
sub check {
    my ($name, $m) = @_;
    my @g = @{$m->{get}};
    cmp_ok(scalar @g, '>=', 100, "$name: requests made");
    is_deeply($m->{get_st}, { 200 => scalar @g }, "$name: GET /static 200");
    is_deeply($m->{post_st}, { '503 unavailable' => scalar @{$m->{post}} },
        "$name: POST /gift 503 unavailable");
}

# --- A: nats-server stopped
my $off = length GiftTest::slurp($ngx->error_log);
$nats->stop;
ok(GiftFaults::wait_log_each($ngx->error_log, [$w],
    qr/disconnected from NATS/, 5, $off), 'A: the worker saw the disconnect');
my $a = measure(100);
summary('stopped', $a);
check('A (stopped)', $a);

# --- B: a tarpit on the NATS port
my $tarpit = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
    LocalPort => $nats->port, Proto => 'tcp', Listen => 64, ReuseAddr => 1)
    or die "tarpit: $!";
my $sel = IO::Select->new($tarpit);
my (@held, %gone);
# the attempts pending now: tarpit connections the worker has not closed
my $open = sub {
    while ($sel->can_read(0)) {
        my $c = $tarpit->accept or last;
        push @held, $c;         # held open, never answered
    }
    for my $i (0 .. $#held) {
        next if $gone{$i};
        my $s = IO::Select->new($held[$i]);
        $gone{$i} = 1 if $s->can_read(0) && !sysread($held[$i], my $x, 4096);
    }
    return grep { !$gone{$_} } 0 .. $#held;
};
# until the worker has given up on an attempt and dialed again
my $b = measure(100, sub { @held < 2 }, $open);
$open->();
summary('tarpit', $b);
diag "B: $b->{during} of $b->{pending} request pairs answered while an "
    . 'attempt stayed pending';
cmp_ok(scalar @held, '>=', 2,
    'B: the worker dialed into the tarpit (' . scalar(@held) . ' connections)');
check('B (tarpit)', $b);
cmp_ok($b->{pending}, '>', 0, 'B: requests made while an attempt was pending');
# a blocked loop answers none of them before the attempt ends
cmp_ok($b->{during}, '>=', $b->{pending} / 2,
    'B: most answered while that attempt was still pending');
unlike(substr(GiftTest::slurp($ngx->error_log), $off), qr/connected to NATS/,
    'B: no connection was made meanwhile');
close $_ for @held;
close $tarpit;

# --- NATS back: accepted again, without restarting nginx
$off = length GiftTest::slurp($ngx->error_log);
$nats->restart;
ok(GiftFaults::wait_log_each($ngx->error_log, [$w], qr/connected to NATS/, 15,
    $off), 'the worker reconnected');
my ($st) = GiftTest::post_gift($ngx->port, GiftTest::gift());
is($st, 202, 'gifts accepted again');
is_deeply([$ngx->workers], [$w], 'the same worker');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
