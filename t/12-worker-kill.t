#!/usr/bin/perl
# A worker killed with SIGKILL while gifts stream in: the master starts a
# new one, which connects to NATS and serves; the dead worker's NATS
# connection goes away; what the dead worker had accepted (202) is stored,
# and a sender that retries what failed ends with each gift stored once.

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

# one worker: every request after the kill must be served by its successor
my $ngx = GiftTest::start_nginx(nats_url => $nats->url, workers => 1);
my ($w0) = GiftFaults::workers_ready($ngx);
ok($w0, 'worker connected to NATS');
is_deeply(GiftFaults::worker_conns($mport), [$w0],
    'nats-server sees the worker');

my $p = GiftFaults::start_posters(port => $ngx->port, conns => 4,
    pace => 0.005, prefix => 'wk');
ok(GiftTest::wait_until(10, sub { $p->count >= 300 }), 'gifts flowing');

my $off = length GiftTest::slurp($ngx->error_log);
my $t_kill = time;
kill 'KILL', $w0;
my $w1;
ok(GiftTest::wait_until(10, sub {
    ($w1) = grep { $_ != $w0 } $ngx->workers;
    $w1;
}), 'the master started a new worker');
ok(GiftFaults::wait_log_each($ngx->error_log, [$w1], qr/connected to NATS/, 10,
    $off), 'the new worker connected to NATS');
my $t_up = time;
my $n = $p->count;
ok(GiftTest::wait_until(10, sub { $p->count >= $n + 300 }),
    'gifts flowing again');
my @rec = $p->stop;

ok(!GiftFaults::pid_alive($w0), 'the killed worker is gone');
is($ngx->pid && GiftTest::alive($ngx->pid), 1, 'the master is alive');
is_deeply([$ngx->workers], [$w1], 'one worker: the new one');
like(substr(GiftTest::slurp($ngx->error_log), $off),
    qr/worker process $w0 exited on signal 9/, 'the master saw the kill');
ok(GiftTest::wait_until(5, sub {
    my $c = GiftFaults::worker_conns($mport);
    $c && "@$c" eq "$w1";
}), "nats-server: only the new worker's connection");

# --- what the senders saw
my (%by, @odd);
for my $r (@rec) {
    my $code = $r->{status} == 202 ? 202
        : $r->{status} == 503 && ref $r->{body} ? "503 $r->{body}{error}"
        : $r->{status} == 599 ? '599 (client: ' . ($r->{raw} =~ s/\s+$//r) . ')'
        : "$r->{status} $r->{raw}";
    $by{$code}++;
    # 599: the dead worker's connections were cut under their requests
    push @odd, $r unless $code =~ /^(202|503 unavailable)$/
        || ($r->{status} == 599 && $r->{t0} < $t_up);
}
diag join(', ', map { "$_: $by{$_}" } sort keys %by);
is(scalar @odd, 0, 'only 202, 503 unavailable, or a cut connection')
    or diag explain [ @odd[0 .. ($#odd > 4 ? 4 : $#odd)] ];
my @after = grep { $_->{t0} > $t_up } @rec;
cmp_ok(scalar @after, '>', 200, 'requests after the new worker connected');
is(scalar(grep { $_->{status} != 202 } @after), 0, 'all 202');

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
my ($ok, $dups) = (0, 0);
for my $g (keys %failed) {
    my $last = $retry->{$g}[-1] or next;
    next unless $last->[0] == 202;
    $ok++;
    $dups++ if $last->[1]{duplicate};
}
is($ok, scalar keys %failed, 'every failed gift accepted on retry');
diag "retried " . scalar(keys %failed) . ", $dups of them had been stored "
    . "by the killed worker";
is(GiftFaults::js_stream_info($nats->url, 'GIFTS')->{state}{messages},
    scalar @rec, 'GIFTS holds each gift exactly once');

my ($st, $body) = GiftTest::post_gift($ngx->port, GiftTest::gift());
is($st, 202, 'the new worker serves');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([grep { !/worker process $w0 exited on signal 9/ }
    $ngx->bad_log_lines], [], 'no [alert] or [emerg] but the kill');

done_testing();
