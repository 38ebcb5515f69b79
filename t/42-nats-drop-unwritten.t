#!/usr/bin/perl
# Publishes that nginx could not even write when its NATS connection drops
# end at once with 503 "unavailable"; those written but not acknowledged
# wait for gift_publish_timeout (503 "publish_timeout").  Told apart by the
# order of the answers, not by how long they took:
#
#   - nats-server frozen (SIGSTOP): it reads nothing, and the publishes of
#     the gifts posted next pile up in the kernel's socket buffers between
#     the worker and the server, then in the worker's own output buffer;
#   - gifts posted in waves, each wave read by nginx before the next, until
#     a wave leaves the bytes in the kernel unchanged: from it on nothing was
#     written;
#   - nats-server killed (SIGKILL): every gift of those waves is answered
#     503 unavailable, and all the "unavailable" answers come before the
#     first publish_timeout (gift_publish_timeout 45s), which goes only to
#     gifts posted no later than any unavailable one;
#   - restarted on the same store: no "unavailable" gift is in GIFTS (a
#     retry is safe: it is stored as new), and new gifts get 202 again.

use strict;
use warnings;
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Socket qw(IPPROTO_TCP TCP_NODELAY);
use Time::HiRes qw(sleep time);
use lib 't/lib';
use GiftTest;
use GiftFaults;

my $JSON = $GiftTest::JSON;
my $WAVE = 150;             # gifts per wave
my $MAX = 3900;             # in flight at most (nginx: 4096 connections)

my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

# One worker: one NATS connection, one output buffer, one order.
my $ngx = GiftTest::start_nginx(nats_url => $nats->url, workers => 1,
    webhook => 'gift_publish_timeout 45s;');
my @w = GiftFaults::workers_ready($ngx);
is(scalar @w, 1, 'the worker is connected to NATS');

my ($st, $body) = GiftTest::post_gift($ngx->port, GiftTest::gift());
is($st, 202, 'a gift is stored before the fault') or diag explain $body;

# Bytes between the worker and nats-server that the server has not read:
# the worker's socket send queue plus the server's receive queue.
my $hex = sprintf('%04X', $nats->port);
sub in_kernel {
    my $n = 0;
    for (split /\n/, GiftTest::slurp('/proc/net/tcp')) {
        my @f = split ' ';
        next unless @f > 4 && $f[4] =~ /^([0-9A-F]+):([0-9A-F]+)$/;
        my ($tx, $rx) = (hex $1, hex $2);
        $n += $rx if $f[1] =~ /:$hex$/;
        $n += $tx if $f[2] =~ /:$hex$/;
    }
    return $n;
}

# The same value three times in a row: what the worker could write is in.
sub settled_in_kernel {
    my @seen;
    GiftTest::wait_until(10, sub {
        push @seen, in_kernel();
        @seen >= 3 && $seen[-1] == $seen[-2] && $seen[-2] == $seen[-3];
    }, 0.1) or return undef;
    return $seen[-1];
}

# The largest gift the webhook takes: each string at its limit (256 bytes,
# the event id 128), so that fewer connections fill the buffers.
my $big = 'x' x 255;
sub big_gift {
    my ($id) = @_;
    return $JSON->encode(GiftTest::gift(eventId => $id,
        userId => "u$big", userName => "n$big", giftName => "g$big",
        giftId => "i$big", roomId => "r$big"));
}
sub long_id { substr($_[0] . '-' . ('p' x 128), 0, 128) }

sub send_request {
    my ($id) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $ngx->port, Proto => 'tcp', Timeout => 5)
        or die "connect: $!";
    setsockopt($s, IPPROTO_TCP, TCP_NODELAY, 1);
    binmode $s;
    my $b = big_gift($id);
    my $req = "POST /gift HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        . "Content-Type: application/json\r\nConnection: close\r\n"
        . 'Content-Length: ' . length($b) . "\r\n\r\n$b";
    GiftTest::io_timeout($s, 10);
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite($s, $req, length($req) - $off, $off);
        die "write: $!" unless defined $n;
        $off += $n;
    }
    return $s;
}

ok(GiftFaults::freeze($nats->pid), 'nats-server frozen');
my $k0 = settled_in_kernel();
ok(defined $k0, 'the bytes in the kernel settle');

my $prefix = "du$$-" . int(time * 1000);
my (@req, @k);          # { s, id, wave }; bytes in the kernel after each wave
my $full;               # the first wave that left them unchanged
my $t_first = time;
for (my $wave = 0; @req + $WAVE <= $MAX; $wave++) {
    for my $i (1 .. $WAVE) {
        my $id = long_id("$prefix-$wave-$i");
        push @req, { s => send_request($id), id => $id, wave => $wave };
    }
    # nginx has accepted every connection and read every request: each
    # publish is queued (or written)
    GiftTest::wait_until(30, sub {
        GiftFaults::unread_bytes($ngx->port) == 0 })
        or BAIL_OUT("wave $wave: nginx did not read the requests");
    $k[$wave] = settled_in_kernel()
        // BAIL_OUT("wave $wave: the bytes in the kernel do not settle");
    if ($wave > 0 && $k[$wave] == $k[$wave - 1]) {
        $full = $wave;
        last;
    }
}
diag sprintf('%d gifts posted in %.1f s; bytes the server has not read: '
    . '%s', scalar @req, time - $t_first, join(' ', $k0 // '?', @k));
ok(defined $full, 'a wave was left entirely in the worker (the kernel '
    . 'buffers were full)') or BAIL_OUT('the kernel buffers never filled');

my $sel = IO::Select->new(map { $_->{s} } @req);
my @early = $sel->can_read(0);
is(scalar @early, 0, 'no request answered before the connection drops')
    or diag 'posting took longer than gift_publish_timeout?';

# Nothing was written since the wave that found the buffers full.
my $off = length GiftTest::slurp($ngx->error_log);
is(in_kernel(), $k[$full - 1], 'nothing written since that wave');
my $t_kill = time;
$nats->kill9;

# Answers in the order they come: one "round" per select() that found some.
my %by_sock = map { ($_->{s} => $_) } @req;
my $round = 0;
my $deadline = time + 120;
while ($sel->count && time < $deadline) {
    my @ready = $sel->can_read($deadline - time) or last;
    $round++;
    for my $s (@ready) {
        my $r = $by_sock{$s};
        my $n = sysread($s, $r->{buf}, 65536, length($r->{buf} // ''));
        next if $n;             # more may come; the server closes at the end
        $sel->remove($s);
        close $s;
        $r->{round} = $round;
        $r->{t} = time;
        my ($code) = ($r->{buf} // '') =~ m{^HTTP/1\.1 (\d+)};
        my ($json) = ($r->{buf} // '') =~ /\r\n\r\n(.*)\z/s;
        my $d = eval { $JSON->decode($json // '') };
        $r->{answer} = !defined $code ? 'none'
            : $code == 503 && ref $d ? "503 $d->{error}" : $code;
    }
}
ok(GiftFaults::wait_log_each($ngx->error_log, \@w,
    qr/disconnected from NATS/, 5, $off), 'the worker saw the disconnect');

my %count;
$count{$_->{answer} // 'no answer'}++ for @req;
diag join(', ', map { "$_: $count{$_}" } sort keys %count);
is(scalar(grep { ($_->{answer} // '') !~
    /^503 (unavailable|publish_timeout)$/ } @req), 0,
    'each gift answered 503 unavailable or 503 publish_timeout');

my @un = grep { ($_->{answer} // '') eq '503 unavailable' } @req;
my @to = grep { ($_->{answer} // '') eq '503 publish_timeout' } @req;
cmp_ok(scalar @un, '>', 0, 'gifts never written: 503 unavailable');
cmp_ok(scalar @to, '>', 0, 'gifts written, not acknowledged: '
    . '503 publish_timeout');
is(scalar(grep { $_->{wave} >= $full && $_->{answer} ne '503 unavailable' }
    @req), 0, 'every gift of the waves that could not be written: '
    . 'unavailable');

my ($un_last) = sort { $b <=> $a } map { $_->{round} } @un;
my ($to_first) = sort { $a <=> $b } map { $_->{round} } @to;
ok(@un && @to && $un_last < $to_first,
    'every "unavailable" answer before the first publish_timeout')
    or diag 'last unavailable in round ' . ($un_last // 'none')
        . ', first publish_timeout in round ' . ($to_first // 'none');
my ($to_wave) = sort { $b <=> $a } map { $_->{wave} } @to;
my ($un_wave) = sort { $a <=> $b } map { $_->{wave} } @un;
ok(@un && @to && $to_wave <= $un_wave,
    'publish_timeout only for gifts posted before the unavailable ones')
    or diag 'a publish_timeout in wave ' . ($to_wave // 'none')
        . ', an unavailable in ' . ($un_wave // 'none');
diag sprintf('unavailable %.1f s after the kill; first publish_timeout '
    . '%.1f s after the first gift', (sort { $b <=> $a } map { $_->{t} } @un)[0]
    - $t_kill, (sort { $a <=> $b } map { $_->{t} } @to)[0] - $t_first)
    if @un && @to;

# --- the same store again: the "unavailable" gifts were not stored
$off = length GiftTest::slurp($ngx->error_log);
$nats->restart;
ok(GiftFaults::wait_log_each($ngx->error_log, \@w, qr/connected to NATS/,
    15, $off), 'the worker reconnected');
my $stored = GiftFaults::stream_ids($nats->url, 'GIFTS');
my %ids = map { ($_->{id} // '') => 1 } values %$stored;
is(scalar(grep { $ids{$_->{id}} } @un), 0,
    'no "unavailable" gift is in GIFTS');

my $h = GiftFaults::Http->new($ngx->port, 30);
my $res = $h->post_json('/gift', $JSON->encode(GiftTest::gift()));
is($res->{status}, 202, 'a new gift after the restart: 202')
    or diag $res->{content};
if (@un) {
    $res = $h->post_json('/gift', big_gift($un[-1]{id}));
    my $d = eval { $JSON->decode($res->{content}) } // {};
    ok($res->{status} == 202 && !$d->{duplicate},
        'an "unavailable" gift sent again: stored as new, not a duplicate')
        or diag $res->{content};
}
$h->disconnect;

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
