#!/usr/bin/perl
# gift_status: Prometheus text with totals across all workers, checked by
# promtool (Prometheus's own parser), and the log variables.

use strict;
use warnings;
use Test::More;
use HTTP::Tiny;
use lib 't/lib';
use GiftTest;
use GiftStream;

my $promtool = eval { GiftTest::find_bin('promtool') };
my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');

my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url, workers => 2,
    http => 'log_format gift \'$gift_event_id $gift_publish_ms $status\'; ',
    webhook => 'access_log logs/gift.log gift;',
    server => 'location = /gift/status { gift_status; } '
        . 'location = /gift/events { gift_sse; }',
);
ok(GiftTest::wait_until(10, sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/g;
    @n >= 2;
}), 'workers ready');

my $get = sub {
    my $r = HTTP::Tiny->new->get($ngx->url('/gift/status'));
    return $r;
};
my $metric = sub {
    my ($text, $name) = @_;
    my $sum = 0;
    my $found = 0;
    for (split /\n/, $text) {
        next if /^#/;
        if (/^\Q$name\E(?:\s|\{)/ || /^\Q$name\E$/) {
            my ($v) = /\s(\S+)$/;
            $sum += $v;
            $found = 1;
        }
    }
    return $found ? $sum : undef;
};
my $label = sub {
    my ($text, $name, $labels) = @_;
    for (split /\n/, $text) {
        return $1 if /^\Q$name\E\{\Q$labels\E\} (\S+)$/;
    }
    return undef;
};

# traffic: 20 accepted over several connections (both workers), 1
# duplicate, 3 invalid, 1 wrong method
my @g = map { GiftTest::gift() } 1 .. 20;
GiftTest::post_many($ngx->port, 4, @g);
GiftTest::post_gift($ngx->port, $g[0]);
GiftTest::post_gift($ngx->port, '{"bad json');
GiftTest::post_gift($ngx->port, { %{GiftTest::gift()}, diamond => 0 });
GiftTest::post_gift($ngx->port, { %{GiftTest::gift()}, platform => 'a.b' });
HTTP::Tiny->new->get($ngx->url('/gift'));
my $sse = GiftStream::SSE->new(port => $ngx->port);
my $nc = GiftStream::nats_connect($nats->port);
$nc->publish_ack(eventId => 'm1', deviceId => 'motor_01', rounds => 1);
$sse->take(1, 5);

my $r = $get->();
is($r->{status}, 200, 'status 200');
like($r->{headers}{'content-type'}, qr{^text/plain; version=0\.0\.4},
    'Prometheus text content type');
my $t = $r->{content};
is($label->($t, 'gift_webhooks_total', 'status="202",code="accepted"'), 20,
    '20 accepted, totalled across workers');
is($label->($t, 'gift_webhooks_total', 'status="202",code="duplicate"'), 1,
    '1 duplicate');
is($label->($t, 'gift_webhooks_total', 'status="400",code="invalid_json"'), 1,
    '1 invalid_json');
is($label->($t, 'gift_webhooks_total', 'status="422",code="invalid_field"'),
    2, '2 invalid_field');
is($label->($t, 'gift_webhooks_total',
    'status="405",code="method_not_allowed"'), 1, '1 method_not_allowed');
is($metric->($t, 'gift_publish_seconds_count'), 21,
    'publish latency histogram counts every PubAck');
is($label->($t, 'gift_publish_seconds_bucket', 'le="+Inf"'), 21,
    '+Inf bucket equals the count');
is($metric->($t, 'gift_nats_connected'), 2, 'both workers connected');
is($label->($t, 'gift_stream_clients', 'protocol="sse"'), 1,
    'one SSE client');
cmp_ok($metric->($t, 'gift_stream_deliveries_total'), '>=', 1,
    'deliveries counted');

SKIP: {
    GiftTest::skip_unless($promtool, 'promtool not installed', 1);
    my $f = $ngx->dir . '/metrics.txt';
    GiftTest::spurt($f, $t);
    my $out = `'$promtool' check metrics < '$f' 2>&1`;
    is($? >> 8, 0, 'promtool check metrics accepts it') or diag $out;
}

# NATS goes away: the gauge says so
$nats->stop;
ok(GiftTest::wait_until(5, sub {
    ($metric->($get->()->{content}, 'gift_nats_connected') // -1) == 0
}), 'gift_nats_connected drops to 0 without NATS');
$nats->start;
ok(GiftTest::wait_until(15, sub {
    my $c = $get->()->{content};
    ($metric->($c, 'gift_nats_connected') // 0) == 2
        && ($metric->($c, 'gift_nats_reconnects_total') // 0) >= 2;
}), 'back to 2, reconnects counted');

# the log variables
my $log = GiftTest::slurp($ngx->dir . '/logs/gift.log');
like($log, qr/^\Q$g[1]{eventId}\E \d+\.\d{3} 202$/m,
    '$gift_event_id and $gift_publish_ms in log_format');
like($log, qr/^- - 400$/m, 'not found for a refused body');

$sse->close;
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
done_testing();
