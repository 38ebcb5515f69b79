#!/usr/bin/perl
# Clients that go away before their PubAck, hundreds at once: nginx
# notices each (499), forgets its publish, and a PubAck that comes later
# finds nothing; no crash, no leak (the worker's RSS, open fds and threads
# return to where they were), and later requests are unaffected.
#
# To be sure the clients leave before their PubAck, nats-server is frozen
# (SIGSTOP) while they post and leave: the connection stays up, the
# publishes wait in its socket, and the PubAcks come once it is thawed.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes qw(sleep time);
use lib 't/lib';
use GiftTest;
use GiftFaults;

my $CLIENTS = 300;

my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

# a connection released by the publish timer (gift_publish_timeout) says
# "no PubAck in time" in the error log; one released by the disconnect
# does not (nats-server stays frozen until the fds are back)
my $ngx = GiftTest::start_nginx(nats_url => $nats->url, workers => 1,
    http => 'gift_publish_timeout 8s;');
my ($w) = GiftFaults::workers_ready($ngx);
ok($w, 'worker connected to NATS') or BAIL_OUT('no worker');

# Open $n connections, each sending a whole POST; returns [socket, id, body].
sub post_and_hold {
    my ($n, $tag) = @_;
    my @c;
    for my $i (1 .. $n) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $ngx->port, Proto => 'tcp') or die "connect: $!";
        my $g = GiftTest::gift();
        $g->{eventId} = "ab-$tag-$i-$$";
        my $body = $GiftTest::JSON->encode($g);
        print $s "POST /gift HTTP/1.1\r\nHost: localhost\r\n"
            . "Content-Type: application/json\r\n"
            . "Content-Length: " . length($body) . "\r\n\r\n$body";
        $s->flush;
        push @c, [$s, $g->{eventId}, $body];
    }
    return @c;
}

# Half leave with a FIN, half with a RST (SO_LINGER 0).
sub leave {
    my (@c) = @_;
    my $i = 0;
    for (@c) {
        setsockopt($_->[0], SOL_SOCKET, SO_LINGER, pack('ii', 1, 0))
            if $i++ % 2;
        close $_->[0];
    }
}

sub aborted_lines {
    scalar(() = GiftTest::slurp($ngx->error_log)
        =~ /client prematurely closed connection/g);
}

# One round: post $CLIENTS gifts with NATS frozen, leave, thaw.
# Returns (true if the worker's fds were back, with no publish timer fired
# meanwhile, the request bodies).
sub abort_round {
    my ($tag, $fds0) = @_;
    my $now = GiftFaults::settled_fds($w);
    GiftFaults::freeze($nats->pid) or die "nats-server did not stop";
    my @c = post_and_hold($CLIENTS, $tag);
    # all accepted and read (each is waiting for its PubAck)
    my $held = GiftTest::wait_until(10, sub {
        (GiftFaults::fd_count($w) // 0) >= $now + $CLIENTS
            && GiftFaults::unread_bytes($ngx->port) == 0
            # and the publishes wait in the frozen server's socket
            && GiftFaults::unread_bytes($nats->port) > 0 });
    my $timers = timer_lines();
    leave(@c);
    my $back = GiftTest::wait_until(60, sub {
        (GiftFaults::fd_count($w) // 1e9) <= $fds0 }, 0.02);
    my $fired = timer_lines() - $timers;
    diag "$tag: $fired requests released by the publish timer" if $fired;
    kill 'CONT', $nats->pid;
    return ($held && $back && !$fired, map { $_->[2] } @c);
}

sub timer_lines {
    scalar(() = GiftTest::slurp($ngx->error_log) =~ /no PubAck in time/g);
}

# --- warm up: ordinary gifts and one round of aborts, then the baseline
my @r = GiftTest::post_many($ngx->port, 10,
    map { GiftTest::gift() } 1 .. 300);
is(scalar(grep { $_->[1] == 202 } @r), 300, 'warm-up gifts accepted');
my $fds0 = GiftFaults::settled_fds($w);
my ($took) = abort_round('warm', $fds0);
ok($took, 'warm-up round: connections held, then released');
@r = GiftTest::post_many($ngx->port, 10, map { GiftTest::gift() } 1 .. 100);

my %base = (fds => GiftFaults::settled_fds($w), rss => GiftFaults::rss_kb($w),
    threads => GiftFaults::thread_count($w));
diag "baseline: RSS $base{rss} kB, $base{fds} fds, $base{threads} threads";

my $ROUNDS = 12;
my (@rss, @aborted);
my $lines0 = aborted_lines();
for my $round (1 .. $ROUNDS) {
    my ($took, @bodies) = abort_round("r$round", $base{fds});
    ok($took, "round $round: $CLIENTS requests held, clients left, "
        . "fds back to the baseline, by the disconnect (no publish timer)");
    push @aborted, @bodies;
    # one worker, one NATS connection, answered in order: a gift accepted
    # now was answered after the late PubAcks of the aborted ones
    my ($st) = GiftTest::post_gift($ngx->port, GiftTest::gift());
    is($st, 202, "round $round: the late PubAcks have arrived");
    push @rss, GiftFaults::rss_kb($w);
}
is(aborted_lines() - $lines0, $ROUNDS * $CLIENTS,
    'each one logged as "client prematurely closed connection"');

# the same with NATS running: clients leave at once, racing their PubAck
my @c = post_and_hold($CLIENTS, 'race');
leave(@c);
ok(GiftTest::wait_until(10, sub {
    (GiftFaults::fd_count($w) // 1e9) <= $base{fds} }),
    'racing the PubAck: fds back to the baseline');

is_deeply([$ngx->workers], [$w], 'the same worker: no crash');

# later requests are unaffected
@r = GiftTest::post_many($ngx->port, 10, map { GiftTest::gift() } 1 .. 100);
is(scalar(grep { $_->[1] == 202 } @r), 100, 'later gifts accepted');
my @acc = map { my $b = $GiftTest::JSON->decode($_->[2]); [$_->[0], $b->{seq}] }
    grep { $_->[1] == 202 } @r;
my @bad = GiftFaults::check_accepted_stored($nats->url, \@acc);
is(scalar @bad, 0, 'and stored at their seq') or diag explain \@bad;

# the aborted gifts reached NATS (it was only frozen): a sender's retry is
# answered 202 with the original, as a duplicate
my @sample = @aborted[map { $_ * int(@aborted / 30) } 0 .. 29];
my $retry = GiftFaults::retry_until_accepted($ngx->port, 5, 3, @sample);
is(scalar(grep { $retry->{$_}[-1][0] == 202 && $retry->{$_}[-1][1]{duplicate} }
    @sample), 30, 'retries of aborted gifts: 202, duplicate');

my %now = (fds => GiftFaults::settled_fds($w), rss => GiftFaults::rss_kb($w),
    threads => GiftFaults::thread_count($w));
diag "after: RSS $now{rss} kB (per round: @rss), $now{fds} fds, "
    . "$now{threads} threads";
is($now{fds}, $base{fds}, 'open fds as before');
is($now{threads}, $base{threads}, 'threads as before');
# RSS swings by up to ~3 MB from one reading to the next: malloc keeps
# what $CLIENTS simultaneous requests used (a connection, a request pool, a
# header buffer: 6 to 8 kB each) and returns it to the system or not.  So
# the bound is that working set plus 1 MB, over all the rounds: a leak of
# one request pool (4 kB) per aborted request would pass it by round 4 and
# end $ROUNDS rounds 10 MB above it.
my $allow = int($CLIENTS * 10 + 1024);
my $max = GiftFaults::percentile(100, @rss, $now{rss});
SKIP: {
    # AddressSanitizer keeps freed memory in quarantine (up to 256 MB), so
    # RSS only grows there; its use-after-free checks stand in
    skip 'RSS bound: not under AddressSanitizer (its quarantine holds '
        . 'freed memory)', 1 if $ENV{GIFT_NGINX_PRELOAD};
    cmp_ok($max - $base{rss}, '<', $allow, "RSS stays within $allow kB of "
        . "the baseline over " . $ROUNDS * $CLIENTS . " aborted requests "
        . "(at most $max kB)");
}

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
