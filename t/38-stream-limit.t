#!/usr/bin/perl
# gift_sse_max_clients: streams per worker, SSE and WebSocket together.
# With the limit reached, one more stream of either kind gets 503
# unavailable "too many streaming clients" with Retry-After, and the
# worker logs "gift_sse_max_clients reached"; the streams already open go
# on; once one closes, its place is taken again.  The stream endpoints'
# refusals are no webhook answers: gift_webhooks_total does not count them.

use strict;
use warnings;
use Test::More;
use HTTP::Tiny;
use JSON::PP qw(decode_json);
use Time::HiRes qw(sleep);
use lib 't/lib';
use GiftTest;
use GiftStream;

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    workers => 1,
    http => 'gift_sse_max_clients 2; gift_retry_after 7;',
    server => 'location = /gift/events { gift_sse; } '
        . 'location = /gift/ws { gift_websocket; } '
        . 'location = /gift/status { gift_status; }',
);
ok(GiftTest::wait_until(10, sub {
    GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/
}), 'the worker follows GIFT_ACKS');

my $sse = GiftStream::SSE->new(port => $ngx->port);
is($sse->status, 200, 'first stream (SSE): 200');
my $ws = GiftStream::WS->new(port => $ngx->port);
is($ws->status, 101, 'second stream (WebSocket): 101');

my $http = HTTP::Tiny->new(timeout => 10, keep_alive => 0);
my $r = $http->get($ngx->url('/gift/events'),
    { headers => { Accept => 'text/event-stream' } });
is($r->{status}, 503, 'third stream (SSE): 503');
is($r->{headers}{'retry-after'}, 7, 'with Retry-After');
my $body = eval { decode_json($r->{content}) } // {};
is($body->{error}, 'unavailable', 'error unavailable');
like($body->{message} // '', qr/too many streaming clients/,
    'message: too many streaming clients') or diag $r->{content};

my $ws3 = GiftStream::WS->new(port => $ngx->port);
is($ws3->status, 503, 'third stream (WebSocket): 503');
like($ws3->body // '', qr/too many streaming clients/,
    'message: too many streaming clients');

my @reached = GiftTest::slurp($ngx->error_log)
    =~ /\[warn\].*gift: gift_sse_max_clients reached/g;
is(scalar @reached, 2, 'each refusal logged: gift_sse_max_clients reached');

# a bad Last-Event-ID: 400 invalid_field (checked before the limit)
$r = $http->get($ngx->url('/gift/events'),
    { headers => { Accept => 'text/event-stream', 'Last-Event-ID' => 'x' } });
is($r->{status}, 400, 'a bad Last-Event-ID: 400');

# none of it is a webhook answer
$r = $http->get($ngx->url('/gift/status'));
is($r->{status}, 200, 'gift_status answers');
my @counted = grep { /^gift_webhooks_total\{/ && !/ 0$/ } split /\n/, $r->{content};
is_deeply(\@counted, [], 'gift_webhooks_total counts none of the streams\' refusals');
like($r->{content}, qr/^gift_webhooks_total\{status="503",code="unavailable"\} 0$/m,
    '... 503 unavailable: 0');

# the open streams go on
my $nc = GiftStream::nats_connect($nats->port);
my $seq = $nc->publish_ack(eventId => "lim$$", deviceId => 'motor_01',
    rounds => 1, status => 'ok', attempts => 1, platform => 'tiktok',
    userId => 'u1', userName => 'Viewer', giftName => 'Motor', diamond => 1,
    quantity => 1)->{seq};
my @e = $sse->take(1, 10);
is($e[0]{id}, $seq, 'the SSE stream goes on');
my @m = $ws->take(1, 10);
is($m[0]{seq}, $seq, 'the WebSocket goes on');

# a place freed is taken again
$sse->close;
my $again;
ok(GiftTest::wait_until(10, sub {
    $again = GiftStream::SSE->new(port => $ngx->port);
    return 1 if $again->status == 200;
    $again->close;
    sleep 0.1;
    0;
}), 'a closed stream frees its place: the next SSE gets 200');
$again->close if $again;
$ws->close;
$nc->close;

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
