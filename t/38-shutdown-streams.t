#!/usr/bin/perl
# Streams end cleanly when nginx reloads or shuts down gracefully, over
# HTTP/1.1 and HTTP/2 (cleartext h2c on its own port, curl
# --http2-prior-knowledge as the client):
#  - SSE over HTTP/1.1: the last chunk ("0\r\n\r\n"), then the close;
#  - SSE over HTTP/2: END_STREAM (curl exits 0; a stream cut off makes it
#    exit 92 or 18), then GOAWAY;
#  - WebSocket: close 1001, and the server waits for the client's close;
#  - the old workers exit, with no "[alert] open socket left";
#  - a stream asked of a worker that is shutting down gets 503 saying so
#    (not "too many streaming clients").

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftStream;

my $curl = GiftTest::find_bin('curl');
GiftTest::skip_all_unless(`$curl -V` =~ /HTTP2/, 'curl without HTTP/2');

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');

my $h2port = GiftTest::free_port();
my $streams = 'location = /gift/events { gift_sse; gift_sse_retry 1s; } '
    . 'location = /gift/ws { gift_websocket; }';
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    workers => 2,
    server => $streams,
    http => "server { listen 127.0.0.1:$h2port http2; $streams }",
);
my $following = sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/g;
    scalar @n;
};
ok(GiftTest::wait_until(10, sub { $following->() >= 2 }),
    'both workers follow GIFT_ACKS');

my $nc = GiftStream::nats_connect($nats->port);
my $n = 0;
sub ack {
    $n++;
    return $nc->publish_ack(eventId => "sd$$-$n", deviceId => 'motor_01',
        rounds => 1, status => 'ok', attempts => 1, platform => 'tiktok',
        userId => "u$n", userName => "Viewer $n", giftName => 'Motor',
        diamond => 1, quantity => 1)->{seq};
}

my $dir = GiftTest::tempdir();

# An SSE stream over HTTP/1.1, read raw (the chunked framing is the point).
sub sse_h1 {
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $ngx->port, Proto => 'tcp', Timeout => 5) or die $!;
    print $s "GET /gift/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        . "Accept: text/event-stream\r\n\r\n";
    return { sock => $s, raw => '' };
}

sub read_to_eof {
    my ($c, $timeout) = @_;
    my $sel = IO::Select->new($c->{sock});
    my $end = time + $timeout;
    while (time < $end) {
        next unless $sel->can_read(0.2);
        my $k = sysread($c->{sock}, my $buf, 65536);
        return 1 unless $k;
        $c->{raw} .= $buf;
    }
    return 0;
}

# Whether the peer closes $sock within $t seconds (a read of 0 bytes;
# data is dropped; an interrupted read is no close).
sub closed {
    my ($sock, $t) = @_;
    my $sel = IO::Select->new($sock);
    my $end = time + $t;
    while ((my $left = $end - time) > 0) {
        next unless $sel->can_read($left);
        my $k = sysread($sock, my $buf, 65536);
        return 1 if defined $k && $k == 0;
    }
    return 0;
}

# An SSE stream over HTTP/2 (h2c): curl in the background.
my $k = 0;
sub sse_h2 {
    $k++;
    my $out = "$dir/h2-$k.body";
    my $pid = GiftTest::spawn("curl-$k", "$dir/h2-$k.log", $curl, '-sS',
        '--http2-prior-knowledge', '-N', '-o', $out, '-w',
        '%{http_version} %{http_code}\n',
        "http://127.0.0.1:$h2port/gift/events");
    return { pid => $pid, out => $out, log => "$dir/h2-$k.log" };
}

sub curl_exit {
    my ($c, $timeout) = @_;
    my $end = time + $timeout;
    while (time < $end) {
        return $? >> 8 if waitpid($c->{pid}, WNOHANG) == $c->{pid};
        sleep 0.05;
    }
    return undef;
}

sub round {
    my ($how) = @_;
    my $h1 = sse_h1();
    my $h2 = sse_h2();
    my $ws = GiftStream::WS->new(port => $ngx->port);
    is($ws->status, 101, "$how: WebSocket open");

    # all three streaming, and live
    ok(GiftTest::wait_until(10, sub {
        GiftTest::slurp($h2->{out}) =~ /gift acknowledgements/
    }), "$how: HTTP/2 stream open");
    my $seq = ack();
    ok(GiftTest::wait_until(10, sub {
        read_to_eof($h1, 0.1);
        GiftTest::slurp($h2->{out}) =~ /^id: $seq$/m
            && $h1->{raw} =~ /id: $seq\n/;
    }), "$how: an acknowledgement reaches both SSE streams");
    my @m = $ws->take(1, 5);
    is($m[0]{seq}, $seq, "$how: and the WebSocket");

    # signals, not $ngx->reload: that waits for the old workers to go,
    # and they wait for this test's close frame
    kill($how eq 'reload' ? 'HUP' : 'QUIT', $ngx->pid);

    is($ws->wait_close(10), 1001, "$how: WebSocket close 1001");
    ok(!closed($ws->{sock}, 0.3),
        "$how: the server waits for the client's close");
    $ws->send_frame(8, pack('n', 1001));
    ok(closed($ws->{sock}, 5), "$how: then closes");

    ok(read_to_eof($h1, 10), "$how: HTTP/1.1 SSE connection closed");
    like($h1->{raw}, qr/\r\n0\r\n\r\n\z/,
        "$how: HTTP/1.1 SSE ends with the last chunk");
    my $st = curl_exit($h2, 10);
    is($st, 0, "$how: HTTP/2 SSE ends with END_STREAM (curl exits 0)")
        or diag GiftTest::slurp($h2->{log});
    like(GiftTest::slurp($h2->{log}), qr/^2 200$/m, "$how: it was HTTP/2");
}

round('reload');
ok(GiftTest::wait_until(15, sub {
    GiftTest::slurp($ngx->error_log) =~ /exiting/
}), 'the old workers exit');
ok(GiftTest::wait_until(10, sub { $following->() >= 4 }),
    'new workers follow GIFT_ACKS');

# A stream asked of a worker that is shutting down: its headers were on
# their way when the reload came, so the old worker reads the request (a
# request under way is no idle connection).  It must not take the stream
# (that would hold the worker), and it must say why: not "too many
# streaming clients", which sends an operator to gift_sse_max_clients.
sub partial {
    my ($head) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $ngx->port, Proto => 'tcp', Timeout => 5) or die $!;
    print $s $head;
    return { sock => $s, raw => '' };
}
# the last reload's workers all gone, so that only the two current ones
# are "old" below
ok(GiftTest::wait_until(15, sub { scalar(my @w = $ngx->workers) == 2 }),
    'only the current two workers left');
# a listening socket's rx_queue in /proc/net/tcp is its accept queue
sub accept_queue {
    my $hex = sprintf '%04X', $ngx->port;
    for (split /\n/, GiftTest::slurp('/proc/net/tcp')) {
        my @f = split ' ';
        next unless ($f[1] // '') =~ /:$hex$/ && ($f[3] // '') eq '0A';
        return hex((split /:/, $f[4])[1]);
    }
    return 0;
}
my $log0 = length GiftTest::slurp($ngx->error_log);
my @late = (
    [ 'SSE', partial("GET /gift/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
      "Accept: text/event-stream\r\n\r\n" ],
    [ 'WebSocket', partial("GET /gift/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        . "Upgrade: websocket\r\nConnection: Upgrade\r\n"),
      "Sec-WebSocket-Version: 13\r\n"
        . "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" ],
);
# accepted by the current workers (a connection still waiting in the
# accept queue would go to a new one), and read
ok(GiftTest::wait_until(10, sub { accept_queue() == 0 }),
    'both partial requests accepted by the current workers');
sleep 0.3;
my %before = map { $_ => 1 } $ngx->workers;
kill 'HUP', $ngx->pid;
ok(GiftTest::wait_until(10, sub {
    my $l = substr(GiftTest::slurp($ngx->error_log), $log0);
    (grep { !$before{$_} } $ngx->workers) >= 2
        && !grep { $l !~ /\b$_#\d+: gracefully shutting down/ } keys %before
}), 'reload: new workers up, the old ones shutting down');
for my $l (@late) {
    my ($what, $c, $rest) = @$l;
    print {$c->{sock}} $rest;
    ok(read_to_eof($c, 10), "$what asked of a worker shutting down: answered and closed");
    like($c->{raw}, qr{\AHTTP/1\.1 503 }, "$what: 503")
        or diag 'accepted by a new worker? ' . substr($c->{raw}, 0, 200);
    like($c->{raw}, qr/"unavailable"/, "$what: unavailable");
    like($c->{raw}, qr/restarting; reconnect/, "$what: the reason is the restart")
        or diag $c->{raw};
    like($c->{raw}, qr/^Retry-After: \d+\r$/m, "$what: with Retry-After");
}
my $log = substr(GiftTest::slurp($ngx->error_log), $log0);
my @refused = $log =~ /stream refused: the worker is shutting down/g;
is(scalar @refused, 2, 'each refusal logged as a shutdown');
unlike($log, qr/gift_sse_max_clients reached/,
    'not as gift_sse_max_clients reached');
ok(GiftTest::wait_until(15, sub { !grep { $before{$_} && kill(0, $_) } keys %before }),
    'the old workers exit');
ok(GiftTest::wait_until(10, sub { $following->() >= 6 }),
    'the new workers follow GIFT_ACKS');

round('graceful shutdown');
is(GiftTest::stop_pid($ngx->pid, 'QUIT', 20), 0,
    'nginx exits (exit status 0)');
my @alerts = grep { /\[alert\]|open socket/ }
    split /\n/, GiftTest::slurp($ngx->error_log);
is_deeply(\@alerts, [], 'no [alert], no "open socket left"');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
$nc->close;

done_testing();
