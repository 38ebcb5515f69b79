#!/usr/bin/perl
# The WebSocket endpoint with a real client library (npm `ws`): handshake,
# messages, ping/pong, filters and resume by message, the close handshake,
# and a refused Origin.

use strict;
use warnings;
use Test::More;
use IPC::Open2;
use lib 't/lib';
use GiftTest;
use GiftStream;

my $root = GiftTest::root();
my $node = eval { GiftTest::find_bin('node') };
GiftTest::skip_all_unless($node, 'node not installed');
if (!-d "$root/node_modules/ws") {
    system("cd '$root' && npm ci --no-audit --no-fund >/dev/null 2>&1");
}
GiftTest::skip_all_unless(-d "$root/node_modules/ws", 'npm ws not installed');

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url, workers => 1,
    http => 'gift_sse_heartbeat 1s;',
    server => 'location = /gift/ws { gift_websocket; '
        . 'gift_websocket_allow_origin http://overlay.example; }',
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/
}), 'worker follows GIFT_ACKS');

my $pid = open2(my $from, my $to, $node, "$root/t/node/ws-client.mjs");
sub cmd {
    my ($c) = @_;
    print $to $GiftTest::JSON->encode($c), "\n";
    $to->flush;
    my $line = <$from>;
    return $line ? $GiftTest::JSON->decode($line) : { error => 'no answer' };
}
my $url = 'ws://127.0.0.1:' . $ngx->port . '/gift/ws';

my $nc = GiftStream::nats_connect($nats->port);
my $n = 0;
sub ack {
    my (%a) = @_;
    $n++;
    return $nc->publish_ack(eventId => "L$n", deviceId => 'motor_01',
        rounds => $n, userName => "V$n", %a)->{seq};
}

is_deeply(cmd({ cmd => 'open', url => $url, origin => 'http://evil.example' }),
    { error => 'refused', status => 403 }, 'wrong Origin refused');
is_deeply(cmd({ cmd => 'open', url => $url, origin => 'http://overlay.example' }),
    { open => JSON::PP::true }, 'ws library connects');

my @s = map { ack(deviceId => "motor_0$_") } 1 .. 3;
my $r = cmd({ cmd => 'take', n => 3 });
is_deeply([map { $_->{seq} } @{$r->{messages}}], \@s, 'messages arrive');
is($r->{messages}[0]{userName}, 'V1', 'acknowledgement JSON');

my $p = cmd({ cmd => 'ping' });
ok($p->{pong}, 'the server answers pings');
$r = cmd({ cmd => 'take', n => 99, timeout => 2500 });
cmp_ok($r->{pings}, '>=', 1, 'and pings on its heartbeat');

cmd({ cmd => 'send', data => { device => 'motor_02' } });
# frames are handled in order: a pong to a later ping says it has the filter
ok(cmd({ cmd => 'ping' })->{pong}, 'filter message handled');
ack(deviceId => 'motor_01');
my $want = ack(deviceId => 'motor_02');
$r = cmd({ cmd => 'take', n => 1 });
is_deeply([map { $_->{seq} } @{$r->{messages}}], [$want],
    'filter set by a message');

is_deeply(cmd({ cmd => 'close', code => 1000 }), { closed => 1000 },
    'close handshake completes with 1000');

# missed while away: reconnect, then resume by a message
my @missed = map { ack() } 1 .. 2;
cmd({ cmd => 'open', url => $url, origin => 'http://overlay.example' });
cmd({ cmd => 'send', data => { lastEventId => $want } });
$r = cmd({ cmd => 'take', n => 2, timeout => 3000 });
is_deeply([map { $_->{seq} } @{$r->{messages}}], \@missed,
    'resume by a message replays what was missed');
my $live = ack();
$r = cmd({ cmd => 'take', n => 1 });
is_deeply([map { $_->{seq} } @{$r->{messages}}], [$live], 'then live');

close $to;
waitpid($pid, 0);
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
