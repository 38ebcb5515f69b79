#!/usr/bin/perl
# The TikTok-Live-Connector forwarder (tools/forwarder) against the real
# stack: nginx with a webhook secret + nats-server.  Recorded TikTok events
# (t/fixtures/tiktok) are posted as the library emits them, signed:
#   1. every fixture: new ones stored, the same message in another form a
#      duplicate, the one without a diamond count rejected (logged);
#   2. nats-server stopped: the forwarder gets 503 and retries with back-off
#      until nats-server is back;
#   3. nginx's workers frozen (SIGSTOP): the forwarder times out and retries
#      (the same body: the late original and the retry are one gift);
# and afterwards GIFTS holds every event exactly once.  Also runs the
# forwarder's own unit tests (node --test) and, where its npm dependencies
# are installed (or can be), checks that the TikTok library loads.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(sleep);
use lib 't/lib';
use GiftTest;

my $node = eval { GiftTest::find_bin('node') };
GiftTest::skip_all_unless($node, 'node not found');

my $root = GiftTest::root();
my $fwdir = "$root/tools/forwarder";
my $dir = GiftTest::tempdir();

# ------------------------------------------------------------ unit tests
my $unit = `cd '$fwdir' && timeout 30 '$node' --test test/ 2>&1`;
is($?, 0, 'forwarder unit tests (node --test tools/forwarder/test)')
    or diag $unit;

# ------------------------------------------------------------ the stack
my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

my $secret = sprintf('fw-%08x%08x-secret', int(rand(2**32)), int(rand(2**32)));
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    workers => 2,
    webhook => qq(gift_webhook_secret "$secret"; gift_publish_timeout 1s;),
);
ok(GiftTest::wait_until(10, sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
    @n >= 2;
}), 'both workers connected to NATS');

# The forwarder in replay mode: ($pid, $log).
my $runs = 0;
sub forwarder {
    my (%env) = @_;
    my @files = @{delete $env{files}};
    $runs++;
    my $log = "$dir/forwarder-$runs.log";
    local %ENV = (%ENV, GIFT_URL => $ngx->url('/gift'),
        GIFT_SECRET => $secret, GIFT_BACKOFF_MS => 100,
        GIFT_BACKOFF_MAX_MS => 1000, GIFT_OVERFLOW_FILE => "$dir/overflow",
        %env);
    my $pid = GiftTest::spawn('forwarder', $log, $node, "$fwdir/index.mjs",
        '--replay', @files);
    return ($pid, $log);
}

sub finish {
    my ($pid, $timeout) = @_;
    # signal 0: only wait (up to $timeout, then KILL); the exit status
    return GiftTest::stop_pid($pid, 0, $timeout);
}

sub summary {
    my ($log) = @_;
    my ($a, $d, $r, $x, $t) = GiftTest::slurp($log) =~
        /forwarded (\d+) \(duplicates (\d+)\), rejected (\d+), not forwarded (\d+), retries (\d+)/
        or return undef;
    return { accepted => $a, duplicates => $d, rejected => $r,
        dropped => $x, retries => $t };
}

my %expect;        # event id => 1, every id that must be in GIFTS once

# ------------------------------------------------------------ 1. fixtures
my @fixtures = sort glob "$root/t/fixtures/tiktok/*.json";
ok(@fixtures >= 10, scalar(@fixtures) . ' recorded TikTok events');
for my $f (@fixtures) {
    next if $f =~ /no_extended/;
    my $s = GiftTest::slurp($f);
    my ($id) = $s =~ /"msgId"\s*:\s*"?(\d+)/;
    $expect{"tt:$id"} = 1;
}
my ($pid, $log) = forwarder(files => \@fixtures);
my $st = finish($pid, 20);
my $sum = summary($log);
# exit 1: one event was rejected (and logged), as it should be
is($st >> 8, 1, 'replay of the fixtures exits 1 (one rejected event)')
    or diag GiftTest::slurp($log);
is_deeply($sum, { accepted => @fixtures - 1, duplicates => @fixtures - 1
        - keys %expect, rejected => 1, dropped => 0, retries => 0 },
    'fixtures: every one answered; the same TikTok message in two forms is '
    . 'a duplicate') or diag GiftTest::slurp($log);
like(GiftTest::slurp($log),
    qr/error gift-forwarder: event tt:7435990123456789099 rejected: 422 .*diamondCount.*; body: \{/,
    'the event without a diamond count is rejected, logged with its body');
like(GiftTest::slurp("$dir/overflow"), qr/^\{.*"msgId":\s*"7435990123456789099"/,
    'and kept in the overflow file');

# ------------------------------------------------------------ recorded events, new ids
# Each accepted fixture again under new message ids, as JSON lines.
sub renumbered {
    my ($name, $n, $base) = @_;
    my @lines;
    my $i = 0;
    for my $k (1 .. $n) {
        for my $f (@fixtures) {
            next if $f =~ /no_extended/;
            my $id = sprintf('%s%05d%05d', $base, $$ % 100000, $i++);
            (my $s = GiftTest::slurp($f)) =~ s/("msgId"\s*:\s*)"?\d+"?/$1"$id"/g;
            $s =~ s/\s*\n\s*/ /g;
            push @lines, $s;
            $expect{"tt:$id"} = 1;
        }
    }
    GiftTest::spurt("$dir/$name", join("\n", @lines) . "\n");
    return ("$dir/$name", scalar @lines);
}

# ------------------------------------------------------------ 2. 503: NATS away
my ($file2, $n2) = renumbered('outage.jsonl', 4, '81');
$nats->stop;
($pid, $log) = forwarder(files => [$file2], GIFT_CONCURRENCY => 4);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($log) =~ /: 503 .*unavailable.*; retry \d+ in \d+ ms/;
}), 'NATS down: the forwarder gets 503 and schedules a retry')
    or diag GiftTest::slurp($log);
ok(GiftTest::wait_until(60, sub {
    # an event's second retry: it went on after the first failed again
    grep { $_ >= 2 }
        GiftTest::slurp($log) =~ /: 503 .*unavailable.*; retry (\d+) in/g;
}) && GiftTest::alive($pid), 'and keeps retrying while NATS is down')
    or diag GiftTest::slurp($log);
$nats->restart;
$st = finish($pid, 30);
is($st, 0, 'after NATS is back, the forwarder delivers everything, exit 0')
    or diag GiftTest::slurp($log);
$sum = summary($log) // {};
is($sum->{accepted}, $n2, "all $n2 events accepted");
is($sum->{dropped} + $sum->{rejected}, 0, 'none dropped or rejected');
cmp_ok($sum->{retries}, '>=', 2, "retries: $sum->{retries}");
like(GiftTest::slurp($log), qr/info gift-forwarder: event tt:\d+: 202.* after \d+ retries/,
    'a retried event is accepted in the end');

# ------------------------------------------------------------ 3. timeouts: nginx frozen
my ($file3, $n3) = renumbered('frozen.jsonl', 1, '82');
ok(GiftTest::wait_until(10, sub {
    my ($s) = GiftTest::post_gift($ngx->port, '{}');
    $s == 401;      # signature_missing: nginx answers (and NATS is back)
}), 'nginx answers');
my @w = $ngx->workers;
is(scalar(@w), 2, "two workers to freeze: @w");
kill 'STOP', @w;
($pid, $log) = forwarder(files => [$file3], GIFT_TIMEOUT_MS => 400);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($log) =~ /timeout after 400 ms; retry \d+/;
}), 'workers frozen: the forwarder times out and schedules a retry')
    or diag GiftTest::slurp($log);
kill 'CONT', @w;
$st = finish($pid, 30);
is($st, 0, 'workers resumed: the forwarder delivers everything, exit 0')
    or diag GiftTest::slurp($log);
$sum = summary($log) // {};
is($sum->{accepted}, $n3, "all $n3 events accepted");

# ------------------------------------------------------------ exactly once
my $info = GiftTest::stream_info($nats->url);
my $last = $info->{GIFTS}{last_seq} // 0;
my %seen;
for my $seq (1 .. $last) {
    my $m = GiftTest::stored($nats->url, 'GIFTS', $seq) or next;
    $seen{$m->{event}{eventId}}++;
}
my @missing = grep { !$seen{$_} } sort keys %expect;
my @twice = grep { $seen{$_} > 1 } sort keys %seen;
my @extra = grep { !$expect{$_} } sort keys %seen;
is(scalar(keys %expect), 8 + $n2 + $n3, scalar(keys %expect) . ' distinct events sent');
is($info->{GIFTS}{messages}, scalar(keys %expect),
    'GIFTS holds as many messages as distinct events');
is_deeply([\@missing, \@twice, \@extra], [[], [], []],
    'every event is in GIFTS exactly once, and nothing else');

# ------------------------------------------------------------ the TikTok library
SKIP: {
    unless (-d "$fwdir/node_modules/tiktok-live-connector") {
        my $npm = eval { GiftTest::find_bin('npm') };
        GiftTest::skip_unless($npm, 'npm not found', 1);
        my $o = `cd '$fwdir' && timeout 30 '$npm' ci --no-audit --no-fund 2>&1`;
        GiftTest::skip_unless(!$?, "npm ci in tools/forwarder failed "
            . "(offline?): $o", 1);
    }
    my $c = `cd '$fwdir' && timeout 20 '$node' index.mjs --check 2>&1`;
    chomp $c;
    is($?, 0, "the live mode's library loads: $c") or diag $c;
}

is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg] in the error log');
is($ngx->stop, 0, 'nginx exits cleanly');
$nats->stop;
done_testing();
