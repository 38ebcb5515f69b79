#!/usr/bin/perl
# The event loop never waits for NATS.  With one worker, while cnats is
# reconnecting, a plain static location on that worker answers as fast as
# before, and the webhook answers 503 unavailable at once:
#   A. nats-server stopped: each reconnect attempt is refused;
#   B. a "tarpit" on the NATS port that accepts connections and never
#      speaks: each attempt waits for the server's INFO until cnats' connect
#      timeout (2s), holding the connection's lock all that time, so any
#      cnats call on the loop that takes it would stall for seconds.
# Bounds are generous (over hundreds of requests, at most 1% of answers
# over 100 ms and none over 1 s; the median within 5 ms of the baseline's)
# and a blocked loop misses them by far: a mutant that asks cnats for the
# connection status on the loop (natsConnection_Status takes that lock)
# answered in 2002 ms during B.

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

# $secs of alternating GET /static and POST /gift; $tick is called between.
sub measure {
    my ($secs, $tick) = @_;
    my (@get, @post, %get_st, %post_st);
    my $end = time + $secs;
    while (time < $end) {
        my $t0 = time;
        my $r = $hs->request('GET', '/static');
        push @get, time - $t0;
        $get_st{$r->{status}}++;
        $t0 = time;
        $r = $hp->post_json('/gift', $GiftTest::JSON->encode(GiftTest::gift()));
        push @post, time - $t0;
        my $b = eval { $GiftTest::JSON->decode($r->{content}) } // {};
        $post_st{$r->{status} . ($b->{error} ? " $b->{error}" : '')}++;
        $tick->() if $tick;
        sleep 0.005;
    }
    return { get => \@get, post => \@post, get_st => \%get_st,
        post_st => \%post_st };
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

my $base = measure(2);
summary('baseline', $base);
is_deeply($base->{post_st}, { 202 => scalar @{$base->{post}} },
    'baseline: gifts accepted');
my $p50 = GiftFaults::percentile(50, @{$base->{get}});

sub check {
    my ($name, $m) = @_;
    my @g = @{$m->{get}};
    cmp_ok(scalar @g, '>', 100, "$name: requests made");
    is_deeply($m->{get_st}, { 200 => scalar @g }, "$name: GET /static 200");
    is_deeply($m->{post_st}, { '503 unavailable' => scalar @{$m->{post}} },
        "$name: POST /gift 503 unavailable");
    # A busy machine's scheduling hiccups are forgiven (1%); a loop waiting
    # on cnats would stall for its connect timeout (2s), again and again.
    my @all = (@g, @{$m->{post}});
    my $slow = grep { $_ >= 0.1 } @all;
    my $max = GiftFaults::percentile(100, @all);
    cmp_ok($slow, '<=', 1 + int(@all / 100), "$name: $slow of "
        . scalar(@all) . ' answers took 100 ms or more');
    cmp_ok($max, '<', 1, sprintf("$name: worst answer %.1f ms", $max * 1000));
    my $med = GiftFaults::percentile(50, @g);
    cmp_ok($med, '<', $p50 + 0.005, sprintf("$name: static median %.2f ms, "
        . "within 5 ms of the baseline's %.2f ms", $med * 1000, $p50 * 1000));
}

# --- A: nats-server stopped
my $off = length GiftTest::slurp($ngx->error_log);
$nats->stop;
ok(GiftFaults::wait_log_each($ngx->error_log, [$w],
    qr/disconnected from NATS/, 5, $off), 'A: the worker saw the disconnect');
my $a = measure(2.5);
summary('stopped', $a);
check('A (stopped)', $a);

# --- B: a tarpit on the NATS port
my $tarpit = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
    LocalPort => $nats->port, Proto => 'tcp', Listen => 64, ReuseAddr => 1)
    or die "tarpit: $!";
my $sel = IO::Select->new($tarpit);
my @held;
my $accept = sub {
    while ($sel->can_read(0)) {
        my $c = $tarpit->accept or last;
        push @held, $c;         # held open, never answered
    }
};
my $b = measure(5, $accept);
$accept->();
summary('tarpit', $b);
cmp_ok(scalar @held, '>=', 2,
    'B: cnats dialed into the tarpit (' . scalar(@held) . ' connections)');
check('B (tarpit)', $b);
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
