#!/usr/bin/perl
# The GIFTS duplicate window against the signature window, seen by nginx
# once connected (nginx -t cannot see the stream):
#   - a GIFTS stream made by hand with a 60 s duplicate window: each worker
#     warns once, naming both settings and the largest window plus skew of
#     the signed webhook locations; gifts are still accepted;
#   - after a reconnect, no second warning for the same stream;
#   - a stream made by giftctl setup (10 minutes): no warning, and each
#     worker says that the window covers the signed webhooks.

use strict;
use warnings;
use Test::More;
use Digest::SHA qw(hmac_sha256_hex);
use lib 't/lib';
use GiftTest;
use GiftFaults;
use GiftStream;

my $JSON = $GiftTest::JSON;
my $K = 'dupwin-key-' . sprintf('%08x', int(rand(2**32))) . '-Xq4r';
my $WARN = qr/\[warn\].*GIFTS stream's duplicate window \(duplicate_window\)/;

sub signed_post {
    my ($port, $path) = @_;
    my $body = $JSON->encode(GiftTest::gift());
    my $t = time;
    my $sig = "t=$t,v1=" . hmac_sha256_hex("$t.$body", $K);
    return GiftTest::post_gift("http://127.0.0.1:$port$path", $body,
        'X-Gift-Signature' => $sig);
}

# Two signed locations: the larger window plus skew (300 s + 30 s) counts.
sub start_nginx {
    my ($nats) = @_;
    return GiftTest::start_nginx(nats_url => $nats->url, workers => 2,
        webhook => qq(gift_webhook_secret "$K";),
        server => <<"EOF");
        location = /gift-short {
            gift_webhook;
            gift_webhook_secret "$K";
            gift_webhook_signature_window 20s;
            gift_webhook_signature_skew 5s;
        }
EOF
}

# ------------------------------------------------ a 60 s duplicate window
{
    my $nats = GiftTest::start_nats();
    my $nc = GiftStream::nats_connect($nats->port);
    my $r = $nc->js_publish('$JS.API.STREAM.CREATE.GIFTS', $JSON->encode({
        name => 'GIFTS', subjects => ['gift.events.>'], storage => 'file',
        retention => 'limits', discard => 'new',
        duplicate_window => 60_000_000_000 }));
    ok($r->{config}, 'a GIFTS stream with a 60 s duplicate window')
        or diag explain $r;
    $nc->close;

    my $ngx = start_nginx($nats);
    my @w = GiftFaults::workers_ready($ngx);
    is(scalar @w, 2, 'two workers connected');
    ok(GiftFaults::wait_log_each($ngx->error_log, \@w, $WARN, 15),
        'each worker warns about the short duplicate window');
    my @lines = grep { $_ =~ $WARN } split /\n/, GiftTest::slurp($ngx->error_log);
    is(scalar @lines, 2, 'once per worker');
    like($lines[0] // '', qr/is 60s, shorter than gift_webhook_signature_window plus gift_webhook_signature_skew \(330s\)/,
        'naming the stream\'s window, both settings and the largest span')
        or diag $lines[0];

    for my $path ('/gift', '/gift-short') {
        my ($st, $b) = signed_post($ngx->port, $path);
        is($st, 202, "a signed gift to $path is still stored")
            or diag explain $b;
    }

    # the same stream after a reconnect: asked again, not warned again
    my $off = length GiftTest::slurp($ngx->error_log);
    $nats->restart;
    ok(GiftFaults::wait_log_each($ngx->error_log, \@w, qr/connected to NATS/,
        15, $off), 'the workers reconnected');
    my ($st, $b) = signed_post($ngx->port, '/gift');
    is($st, 202, 'a signed gift after the reconnect: 202') or diag explain $b;
    @lines = grep { $_ =~ $WARN } split /\n/, GiftTest::slurp($ngx->error_log);
    is(scalar @lines, 2, 'no second warning for the same stream');

    is($ngx->stop, 0, 'nginx exits cleanly');
    is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
    $nats->stop;
}

# ------------------------------------------------ giftctl setup: 10 minutes
{
    my $nats = GiftTest::start_nats();
    my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
    is($rc, 0, 'giftctl setup') or diag $out;

    my $ngx = start_nginx($nats);
    my @w = GiftFaults::workers_ready($ngx);
    is(scalar @w, 2, 'two workers connected');
    ok(GiftFaults::wait_log_each($ngx->error_log, \@w,
        qr/GIFTS duplicate window \(600s\) covers signed webhooks \(330s\)/,
        15), 'each worker checked the stream: the window covers them');
    my ($st, $b) = signed_post($ngx->port, '/gift');
    is($st, 202, 'a signed gift: 202') or diag explain $b;
    is(scalar(grep { $_ =~ $WARN }
        split /\n/, GiftTest::slurp($ngx->error_log)), 0, 'no warning');

    is($ngx->stop, 0, 'nginx exits cleanly');
    is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
}

done_testing();
