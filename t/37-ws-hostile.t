#!/usr/bin/perl
# /gift/ws against hostile clients (docs/security.md), real nginx:
#  - Origin: without gift_websocket_allow_origin only the request's own
#    origin (scheme, host, port of Host) or no Origin; anything else 403;
#  - 100,000 pings on one connection: the worker's memory stays flat, and
#    the latest ping is answered;
#  - frames count against gift_websocket_frame_rate: a flood gets 1008;
#  - close codes checked (1002, 1007), text checked as UTF-8 (1007);
#  - a client that answers no ping is closed after a bound;
#  - after its own close the server waits for the client's, bounded;
#  - the message limit is per time window, not per connection.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftStream;

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');

my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    workers => 1,
    http => 'gift_sse_heartbeat 1s;',
    server => 'location = /gift/ws { gift_websocket; } '
        . 'location = /gift/ws-fast { gift_websocket; '
        . 'gift_websocket_frame_rate 1000000; } '
        . 'location = /gift/ws-list { gift_websocket; '
        . 'gift_websocket_allow_origin https://overlay.example; }',
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/;
}), 'worker follows GIFT_ACKS');
my $port = $ngx->port;

sub ws {
    my (%a) = @_;
    return GiftStream::WS->new(port => $port, %a);
}

# ------------------------------------------------------------ Origin

my $self = "http://127.0.0.1:$port";
my @cases = (
    [101, "127.0.0.1:$port", $self, 'its own origin'],
    [101, "127.0.0.1:$port", undef, 'no Origin (not a browser)'],
    [101, "LOCALHOST:$port", "http://localhost:$port", 'host in any case'],
    [101, '127.0.0.1', 'http://127.0.0.1:80', 'port 80 implied on both'],
    [403, "127.0.0.1:$port", 'http://evil.example', 'a foreign site'],
    [403, "127.0.0.1:$port", "http://localhost:$port", 'another host name'],
    [403, "127.0.0.1:$port", "https://127.0.0.1:$port", 'another scheme'],
    [403, "127.0.0.1:$port", 'http://127.0.0.1:' . ($port + 1),
        'another port'],
    [403, "127.0.0.1:$port", 'null', 'Origin: null (sandboxed, file:)'],
    [403, "127.0.0.1:$port", "$self.evil.example", 'a prefix of it'],
    [403, "evil.example:$port", "http://evil.example:$port",
        'a rebound name: refused by nginx.conf.example, see t/41'],
);
for my $c (@cases) {
    my ($want, $host, $origin, $name) = @$c;
    # the rebound-name case is same-origin by construction: only the
    # server_name list of the example configuration stops it
    next if $name =~ /rebound/;
    my $w = ws(host => $host, headers => { Origin => $origin });
    is($w->status, $want, "Origin " . ($origin // '(none)')
        . " on Host $host: $want ($name)");
    like($w->body // '', qr/"origin_refused"/, '  with origin_refused')
        if $want == 403;
    $w->close;
}
{
    my $w = ws(path => '/gift/ws-list',
        headers => { Origin => 'https://overlay.example' });
    is($w->status, 101, 'allow_origin: a listed origin');
    $w->close;
    $w = ws(path => '/gift/ws-list', host => "127.0.0.1:$port",
        headers => { Origin => $self });
    is($w->status, 403, 'allow_origin: its own origin only when listed');
}

# ------------------------------------------------------------ ping flood

my ($worker) = $ngx->workers;
sub rss_kb {
    my ($l) = GiftTest::slurp("/proc/$worker/status") =~ /^VmRSS:\s+(\d+)/m;
    return $l // 0;
}

# masked with a zero mask: a valid client frame the test can write fast
sub ping_frame { "\x89" . chr(0x80 | length $_[0]) . "\0\0\0\0" . $_[0] }

# Send $n pings in batches of 1,000 written at once; after each batch, wait
# for the answer to its last ping (only the latest must be answered),
# answering the server's own pings meanwhile.  Returns how many batches
# got that answer.
sub flood {
    my ($w, $n, $tag) = @_;
    my $answered = 0;
    for my $b (1 .. $n / 1000) {
        # full-size payloads (125 bytes): the old per-pong copies cost
        # 12 MiB per 100,000
        my $pad = 'x' x 117;
        my $batch = join '', map { ping_frame(sprintf('%s%03d%04d', $tag,
            $b % 1000, $_) . $pad) } 1 .. 1000;
        my $last = sprintf('%s%03d%04d', $tag, $b % 1000, 1000) . $pad;
        syswrite($w->{sock}, $batch) == length $batch or die "write: $!";
        $answered++ if GiftTest::wait_until(20, sub {
            my $f = $w->next_frame(0.5) or return 0;
            return $f->{op} == 10 && $f->{payload} eq $last;
        }, 0);
    }
    return $answered;
}

{
    my $w = ws(path => '/gift/ws-fast');
    is($w->status, 101, 'flood client connected');
    is(flood($w, 2000, 'w'), 2, 'warm-up: 2,000 pings, the last of each '
        . 'batch answered');
    my $rss0 = rss_kb();
    my $t0 = time;
    is(flood($w, 100_000, 'p'), 100,
        '100,000 pings: the last of every batch of 1,000 answered');
    my $rss1 = rss_kb();
    my $grew = $rss1 - $rss0;
    cmp_ok($grew, '<', 2048, "worker RSS grew $grew KiB for 100,000 pings "
        . '(< 2 MiB; was 12 MiB)');
    diag sprintf('100,000 pings in %.1f s; worker RSS %d -> %d KiB',
        time - $t0, $rss0, $rss1);
    ok(!$w->eof, 'the connection is still open');
    $w->close;
}

# ------------------------------------------------------------ frame rate

{
    my $w = ws();
    my $sock = $w->{sock};
    my $batch = join '', map { ping_frame("r$_") } 1 .. 1500;
    syswrite($sock, $batch);
    is($w->wait_close(10), 1008,
        '1,500 pings at once (default 100/s over 10 s): close 1008');
}

# ------------------------------------------------------------ close codes

for my $c ([pack('n', 1005), 1002, '1005 (reserved)'],
    [pack('n', 1006), 1002, '1006 (reserved)'],
    [pack('n', 1015), 1002, '1015 (reserved)'],
    [pack('n', 999), 1002, '999'], [pack('n', 2999), 1002, '2999'],
    [pack('n', 5000), 1002, '5000'], ["\x03", 1002, 'a one-byte payload'],
    [pack('n', 1000) . "\xff\xfe", 1007, 'a reason that is not UTF-8'],
    [pack('n', 3000) . 'bye', 3000, '3000 echoed'],
    [pack('n', 4999), 4999, '4999 echoed'],
    [pack('n', 1001), 1001, '1001 echoed'], ['', 1000, 'no code: 1000'])
{
    my ($payload, $want, $name) = @$c;
    my $w = ws();
    $w->send_frame(8, $payload);
    is($w->wait_close(5), $want, "client close $name: $want");
}

# ------------------------------------------------------------ UTF-8

{
    my $w = ws();
    $w->send_text("{\"device\":\"motor_\xff\"}");
    is($w->wait_close(5), 1007, 'text that is not UTF-8: 1007');
    $w = ws();
    $w->send_text("{\"device\":\"mot\xed\xa0\x80r\"}");
    is($w->wait_close(5), 1007, 'an encoded surrogate: 1007');
    $w = ws();
    $w->send_text("{\"device\":\"mot\xc3\xb6r\"}");
    $w->send_frame(1, "{\"device\":\"\xc3", fin => 0);
    $w->send_frame(0, "\xb6\"}");
    is($w->wait_close(1.5), undef,
        'UTF-8 text, and a character split across fragments: no close');
    $w->close;
}

# ------------------------------------------------------------ dead clients

{
    my $dead = ws();
    $dead->{no_pong} = 1;
    my $alive = ws();
    my $t0 = time;
    my $gone = GiftTest::wait_until(15, sub {
        $dead->next_frame(0.1);
        $alive->next_frame(0.1);      # answers the pings it reads
        $dead->eof;
    });
    ok($gone, sprintf('a client that answers no ping is closed (after '
        . '%.1f s, heartbeat 1 s)', time - $t0));
    ok(!$alive->eof, 'one that answers stays');
    $alive->close;
}

# ------------------------------------------------------------ close wait

{
    my $w = ws();
    $w->send_frame(2, "\x00");
    is($w->wait_close(5), 1003, 'binary: the server closes with 1003');
    $w->_fill(0.3);
    ok(!$w->eof, 'and waits for the client\'s close frame');
    $w->send_frame(8, pack('n', 1000));
    ok(GiftTest::wait_until(5, sub { $w->_fill(0.1); $w->eof }),
        'which ends the connection');

    my $mute = ws();
    $mute->send_frame(2, "\x00");
    is($mute->wait_close(5), 1003, 'a client that never answers the close');
    my $t0 = time;
    ok(GiftTest::wait_until(15, sub { $mute->_fill(0.1); $mute->eof }),
        sprintf('is closed after a bound (%.1f s)', time - $t0));
}

# ------------------------------------------------------------ messages

{
    my $w = ws(path => '/gift/ws-fast');
    $w->send_text('{"device":"m1"}') for 1 .. 60;
    is($w->wait_close(1), undef, '60 messages in one window: fine');
    # the limit is per 10-second window: wait one out (the rule itself is
    # about time, so time it is), answering the server's pings meanwhile
    my $end = time + 10.5;
    $w->next_frame($end - time) while time < $end && !$w->eof;
    ok(!$w->eof, 'still connected after the window');
    $w->send_text('{"device":"m2"}') for 1 .. 60;
    is($w->wait_close(1), undef,
        '60 more in the next window: fine (120 on one connection)');
    $w->send_text('{"device":"m3"}') for 1 .. 10;
    is($w->wait_close(5), 1008, 'over 64 in one window: 1008');
}

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
