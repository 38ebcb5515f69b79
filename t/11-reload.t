#!/usr/bin/perl
# `nginx -s reload`, twice, while gifts stream in over several keep-alive
# connections:
#   - every answer is a 202 or a 503 (a new worker not yet connected to
#     NATS says "unavailable"); a keep-alive connection closed by an old
#     worker between two requests is the client's to reconnect, and such a
#     request was never processed;
#   - every 202 is in GIFTS at its seq, and a sender that retries ends with
#     each gift stored exactly once;
#   - the old workers exit with code 0: the NATS client's connection closed
#     in time (and its DNS thread, if any, gone), no socket left open (nginx alerts on those), their
#     NATS connections closed; the master has no thread and no new fd.

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
my $d = $ngx->dir;
my @gen = ([GiftFaults::workers_ready($ngx)]);
is(scalar @{$gen[0]}, 2, 'two workers, each connected to NATS');

my $master = $ngx->pid;
my $master_fds = GiftFaults::fd_count($master);
is(GiftFaults::thread_count($master), 1, 'the master has one thread');

my $p = GiftFaults::start_posters(port => $ngx->port, conns => 6,
    pace => 0.005, prefix => 'rl');

for my $round (1, 2) {
    my $n0 = $p->count;
    ok(GiftTest::wait_until(30, sub { $p->count >= $n0 + 300 }),
        "reload $round: gifts flowing");
    my $off = length GiftTest::slurp($ngx->error_log);
    my @old = @{$gen[-1]};
    if ($round == 1) {
        my $nginx = GiftTest::find_bin('nginx');
        # the sanitizer build of the module loads only after the runtime
        my $pre = GiftTest::nginx_env();
        is(system("$pre$nginx -p $d/ -c $d/nginx.conf -e $d/error.log "
            . "-s reload 2>>$d/signal.log"), 0, 'nginx -s reload');
        ok(GiftTest::wait_until(10, sub {
            my %o = map { $_ => 1 } @old;
            my @w = $ngx->workers;
            @w == 2 && !grep { $o{$_} } @w;
        }), 'reload 1: two new workers');
    } else {
        $ngx->reload;           # SIGHUP to the master, as `nginx -s` does
        pass('reload 2: two new workers');
    }
    push @gen, [$ngx->workers];
    ok(GiftFaults::wait_log_each($ngx->error_log, $gen[-1],
        qr/connected to NATS/, 10, $off),
        "reload $round: new workers connected");
    ok(GiftTest::wait_until(15, sub {
        !grep { GiftFaults::pid_alive($_) } @old }),
        "reload $round: old workers gone");
    my $log = substr(GiftTest::slurp($ngx->error_log), $off);
    for my $w (@old) {
        like($log, qr/worker process $w exited with code 0/,
            "reload $round: old worker $w exited with code 0");
    }
}
my $n0 = $p->count;
ok(GiftTest::wait_until(10, sub { $p->count >= $n0 + 300 }),
    'gifts flowing after the reloads');
my @rec = $p->stop;

# --- what the senders saw
my (%by, @odd, @closed);
for my $r (@rec) {
    my $code = $r->{status} == 202 ? 202
        : $r->{status} == 503 && ref $r->{body} ? "503 $r->{body}{error}"
        : $r->{status} == 599 ? '599 (client: ' . ($r->{raw} =~ s/\s+$//r) . ')'
        : "$r->{status} $r->{raw}";
    $by{$code}++;
    if ($r->{status} == 599) {
        # the connection closed under a request (599: the client's own code)
        push @closed, $r;
        push @odd, $r unless $r->{raw} =~
            /closed|reset|Broken pipe|end of stream|EOF/i;
    } elsif ($code !~ /^(202|503 unavailable)$/) {
        push @odd, $r;
    }
}
diag join(', ', map { "$_: $by{$_}" } sort keys %by);
cmp_ok(scalar @rec, '>', 800, 'gifts posted');
is(scalar @odd, 0, 'only 202, 503 unavailable, or a closed keep-alive')
    or diag explain [ @odd[0 .. ($#odd > 4 ? 4 : $#odd)] ];

my @acc = map { [$_->{id}, $_->{body}{seq}, $_->{body}{duplicate}] }
    grep { $_->{status} == 202 } @rec;
is(scalar(grep { $_->[2] } @acc), 0, 'no duplicate among first attempts');
my @bad = GiftFaults::check_accepted_stored($nats->url, \@acc);
is(scalar @bad, 0, scalar(@acc) . ' accepted gifts all in GIFTS at their seq')
    or diag explain [ @bad[0 .. ($#bad > 9 ? 9 : $#bad)] ];
@bad = GiftFaults::check_with_giftctl($nats->url, 10, @acc);
is(scalar @bad, 0, 'giftctl get agrees on a sample') or diag explain \@bad;

# --- a sender retries what failed
my %failed = map { $_->{gift} => $_ } grep { $_->{status} != 202 } @rec;
my $retry = GiftFaults::retry_until_accepted($ngx->port, 4, 5, keys %failed);
my ($ok, $closed_dup) = (0, 0);
for my $g (keys %failed) {
    my $last = $retry->{$g}[-1] or next;
    next unless $last->[0] == 202;
    $ok++;
    $closed_dup++ if $failed{$g}{status} == 599 && $last->[1]{duplicate};
}
is($ok, scalar keys %failed, 'every failed gift accepted on retry');
is($closed_dup, 0, 'a request cut by a closing connection was not processed');
is(GiftFaults::js_stream_info($nats->url, 'GIFTS')->{state}{messages},
    scalar @rec, 'GIFTS holds each gift exactly once');

# --- a reload while the NATS client is reconnecting (nats-server stopped): closing a
# connection that is reconnecting must not hold up the old workers' exit
my @old = @{$gen[-1]};
my $off = length GiftTest::slurp($ngx->error_log);
$nats->stop;
ok(GiftFaults::wait_log_each($ngx->error_log, \@old,
    qr/disconnected from NATS/, 5, $off), 'NATS down: the workers saw it');
$ngx->reload;
push @gen, [$ngx->workers];
# while NATS is still down (it stays down until they are gone)
ok(GiftTest::wait_until(60, sub { !grep { GiftFaults::pid_alive($_) } @old }),
    'NATS down: old workers gone');
my $log = substr(GiftTest::slurp($ngx->error_log), $off);
like($log, qr/worker process $_ exited with code 0/,
    "NATS down: old worker $_ exited with code 0") for @old;
$off = length GiftTest::slurp($ngx->error_log);
$nats->restart;
ok(GiftFaults::wait_log_each($ngx->error_log, $gen[-1], qr/connected to NATS/,
    15, $off), 'NATS back: the new workers connected');
my ($st) = GiftTest::post_gift($ngx->port, GiftTest::gift());
is($st, 202, 'NATS back: gifts accepted');

# --- old workers left nothing behind
my @log = split /\n/, GiftTest::slurp($ngx->error_log);
is_deeply([grep { /worker process \d+ exited with code [1-9]/ } @log], [],
    'every worker exited with code 0');
is_deeply([grep { /threads did not stop in time/ } @log], [],
    'no NATS thread held up the exit');
is_deeply([grep { /open socket .* left in connection/ } @log], [],
    'no socket left open');
is_deeply([grep { /exited on signal/ } @log], [], 'no worker crashed');
is_deeply(GiftFaults::worker_conns($mport), [sort @{$gen[-1]}],
    'nats-server: one connection per current worker, none from old ones');
is(GiftFaults::fd_count($master), $master_fds, 'master: no fd gained');
is(GiftFaults::thread_count($master), 1, 'master: still one thread');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
