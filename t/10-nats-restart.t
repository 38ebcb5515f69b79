#!/usr/bin/perl
# nats-server killed (SIGKILL) while gifts stream in, then restarted on the
# same store, with nginx left running:
#   - in flight at the kill: 503 publish_timeout, or a 202 that is stored;
#   - while NATS is down: 503 unavailable, with Retry-After;
#   - after the restart: 202 again, from the same workers (no nginx restart);
#   - every 202 is in GIFTS at its seq; a sender that retries what failed
#     ends with every gift stored exactly once.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(sleep time);
use lib 't/lib';
use GiftTest;
use GiftFaults;

my $mport = GiftTest::free_port();
my $nats = GiftTest::start_nats(args => ['-m', $mport]);
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

my $ngx = GiftTest::start_nginx(nats_url => $nats->url, workers => 2);
my @w0 = GiftFaults::workers_ready($ngx);
is(scalar @w0, 2, 'two workers, each connected to NATS');

my $p = GiftFaults::start_posters(port => $ngx->port, conns => 6,
    pace => 0.008, prefix => 'nr');

# Two outages: nats-server killed while it runs, and killed while frozen
# (SIGSTOP first, so that requests are surely waiting for their PubAcks).
my @rounds;
for my $how ('running', 'frozen') {
    my %t = (start => time);
    my $n0 = $p->count;
    ok(GiftTest::wait_until(10, sub { $p->count >= $n0 + 200 }),
        "$how: gifts flowing");
    if ($how eq 'frozen') {
        GiftFaults::freeze($nats->pid) or die 'nats-server did not stop';
        # requests are waiting for their PubAcks: bytes the frozen
        # server has not read
        ok(GiftTest::wait_until(30, sub {
            GiftFaults::unread_bytes($nats->port) > 0 }),
            "$how: publishes wait in the frozen server's socket");
    }
    my $off = length GiftTest::slurp($ngx->error_log);
    $t{kill} = time;
    $nats->kill9;
    ok(GiftFaults::wait_log_each($ngx->error_log, \@w0,
        qr/disconnected from NATS/, 5, $off),
        "$how: each worker saw the disconnect");
    $t{down} = time;
    # every connection has finished a request begun after the workers knew:
    # what was in flight at the kill has ended (after gift_publish_timeout)
    ok(GiftTest::wait_until(60, sub { $p->each_began_after($t{down}) }),
        "$how: what was in flight at the kill has been answered");
    # a few outage answers before NATS comes back
    my $n_down = $p->count;
    GiftTest::wait_until(60, sub { $p->count >= $n_down + 100 });

    # the same server, the same store, the same port
    my $log_off = length GiftTest::slurp($ngx->error_log);
    $t{restart} = time;
    $nats->restart;
    ok(GiftFaults::wait_log_each($ngx->error_log, \@w0, qr/connected to NATS/,
        15, $log_off), "$how: each worker reconnected");
    $t{up} = time;
    my $n_up = $p->count;
    ok(GiftTest::wait_until(10, sub { $p->count >= $n_up + 200 }),
        "$how: gifts flowing again");
    $t{end} = time;
    push @rounds, [$how, \%t];
}
my @rec = $p->stop;

is_deeply([$ngx->workers], \@w0, 'the same workers: nginx was not restarted');
ok(GiftTest::alive($ngx->pid), 'master alive');
is_deeply(GiftFaults::worker_conns($mport), [sort @w0],
    'nats-server sees one connection per worker again');

# --- every answer is 202 or one of the two outage 503s
my (%by, @odd);
for my $r (@rec) {
    my $code = $r->{status} == 202 ? 202
        : $r->{status} == 503 && ref $r->{body} ? "503 $r->{body}{error}"
        : "$r->{status} $r->{raw}";
    $by{$code}++;
    push @odd, $r unless $code =~ /^(202|503 publish_timeout|503 unavailable)$/;
}
diag join(', ', map { "$_: $by{$_}" } sort keys %by);
is(scalar @odd, 0, 'only 202, 503 publish_timeout, 503 unavailable')
    or diag explain [ @odd[0 .. ($#odd > 4 ? 4 : $#odd)] ];

# Each round's requests: those that ended within it.
my $prev = 0;
for my $round (@rounds) {
    my ($how, $t) = @$round;
    my @in = grep { $_->{t1} > $prev && $_->{t1} <= $t->{end} } @rec;
    $prev = $t->{end};

    my @before = grep { $_->{t1} < $t->{kill} } @in;
    cmp_ok(scalar @before, '>', 50, "$how: gifts before the kill");
    is(scalar(grep { $_->{status} != 202 } @before), 0,
        "$how: all 202 before the kill");

    # began once the workers knew NATS was gone, ended before it returned
    my @down = grep { $_->{t0} > $t->{down} && $_->{t1} < $t->{restart} } @in;
    cmp_ok(scalar @down, '>', 50, "$how: requests during the outage");
    is(scalar(grep { !($_->{status} == 503 && ref $_->{body}
            && $_->{body}{error} eq 'unavailable') } @down), 0,
        "$how: each one 503 unavailable");

    my @timeouts = grep { ref $_->{body}
        && ($_->{body}{error} // '') eq 'publish_timeout' } @in;
    is(scalar(grep { $_->{t0} > $t->{down} } @timeouts), 0,
        "$how: publish_timeout only for requests in flight at the kill");
    # not before the timeout (how long after depends on the machine)
    is(scalar(grep { $_->{t1} - $_->{t0} < 1.9 } @timeouts), 0,
        "$how: publish_timeout no sooner than gift_publish_timeout (2s)");
    cmp_ok(scalar @timeouts, '>', 0,
        "$how: requests waiting for a PubAck got publish_timeout")
        if $how eq 'frozen';

    my @after = grep { $_->{t0} > $t->{up} } @in;
    diag sprintf('%s: down after %.0f ms, restarted at %.1f s, '
        . 'reconnected at %.1f s', $how,
        ($t->{down} - $t->{kill}) * 1000,
        map { $t->{$_} - $t->{kill} } qw(restart up));
    cmp_ok(scalar @after, '>', 100, "$how: requests after the reconnect");
    is(scalar(grep { $_->{status} != 202 } @after), 0,
        "$how: all 202 after it");
}

my @r503 = grep { $_->{status} == 503 } @rec;
is(scalar(grep { ($_->{raw} // '') !~ /"error"/ } @r503), 0,
    '503s carry a JSON error');
cmp_ok(scalar @r503, '>', 100, scalar(@r503) . ' answers 503');
is_deeply([sort keys %{{ map { ($_->{retry_after} // 'none') => 1 } @r503 }}],
    ['1'], 'each 503 with Retry-After: 1 (gift_retry_after)');

# --- every 202 is stored at its seq
my @acc = map { [$_->{id}, $_->{body}{seq}, $_->{body}{duplicate}] }
    grep { $_->{status} == 202 } @rec;
is(scalar(grep { $_->[2] } @acc), 0, 'no duplicate among first attempts');
my $stored = GiftFaults::stream_ids($nats->url, 'GIFTS');
my @bad = GiftFaults::check_accepted_stored($nats->url, \@acc, $stored);
is(scalar @bad, 0, scalar(@acc) . ' accepted gifts all in GIFTS at their seq')
    or diag explain [ @bad[0 .. ($#bad > 9 ? 9 : $#bad)] ];
@bad = GiftFaults::check_with_giftctl($nats->url, 15, @acc);
is(scalar @bad, 0, 'giftctl get agrees on a sample') or diag explain \@bad;

# --- a sender retries what failed: each gift ends stored exactly once
my %failed = map { $_->{gift} => $_ } grep { $_->{status} != 202 } @rec;
my $retry = GiftFaults::retry_until_accepted($ngx->port, 6, 5, keys %failed);
my ($ok, $dups, $unavail_dup) = (0, 0, 0);
for my $g (keys %failed) {
    my $last = $retry->{$g}[-1] or next;
    next unless $last->[0] == 202;
    $ok++;
    next unless $last->[1]{duplicate};
    $dups++;
    $unavail_dup++ if ($failed{$g}{body}{error} // '') eq 'unavailable';
}
is($ok, scalar keys %failed, 'every failed gift accepted on retry');
diag "retried " . scalar(keys %failed) . ": $dups had been stored "
    . "(publish_timeout while the PubAck was lost)";
is($unavail_dup, 0, '"unavailable" gifts had not been stored');

my $info = GiftFaults::js_stream_info($nats->url, 'GIFTS');
is($info->{state}{messages}, scalar @rec,
    'GIFTS holds each gift exactly once');
is(GiftTest::stream_info($nats->url)->{GIFTS}{messages}, scalar @rec,
    'giftctl info agrees');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
