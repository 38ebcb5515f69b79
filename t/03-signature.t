#!/usr/bin/perl
# X-Gift-Signature end to end (real nginx with 2 workers + nats-server):
# two secrets in rotation, every 401 code, the time window on both sides,
# a replay that is deduplicated, a location without a secret (and its
# start-up warning), and no secret in the error log.

use strict;
use warnings;
use Test::More;
use Digest::SHA qw(hmac_sha256_hex);
use lib 't/lib';
use GiftTest;

my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

my $rnd = sprintf('%08x%08x', int(rand(2**32)), int(rand(2**32)));
my $K1 = "old-key-$rnd-Q7zp";           # the key being rotated out
my $K2 = "new-key-$rnd-W3xk";           # the key being rotated in
my $K3 = "srv-key-$rnd-Z9mv";           # a server-level key (inherited)
my $port2 = GiftTest::free_port();

my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    workers => 2,
    log_level => 'debug',               # the secrets must not leak even here
    webhook => qq(gift_webhook_secret "$K1"; gift_webhook_secret "$K2";),
    server => <<"EOF",
        location = /gift-short {
            gift_webhook;
            gift_webhook_secret "$K1";
            gift_webhook_signature_window 10s;
        }
        location = /gift-open {
            gift_webhook;
        }
EOF
    http => <<"EOF",
    server {
        listen 127.0.0.1:$port2;
        gift_webhook_secret "$K3";
        location = /gift {
            gift_webhook;
        }
    }
EOF
);
ok(GiftTest::wait_until(10, sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
    @n >= 2;
}), 'both workers connected to NATS');

my $port = $ngx->port;
my $JSON = $GiftTest::JSON;
my %good;          # event id => seq
my @answers;       # every response body, to look for the secrets
my $n = 0;

sub body {
    my (%o) = @_;
    $n++;
    my %g = (event => 'gift', platform => 'tiktok', userId => "sig_user_$n",
        giftName => 'Motor', diamond => 10, quantity => 1,
        timestamp => 1700000000000 + $n, eventId => "sig-$$-$n", %o);
    delete $g{$_} for grep { !defined $g{$_} } keys %g;
    return $JSON->encode(\%g);
}

sub sig {
    my ($key, $body, $t) = @_;
    $t //= time;
    return "t=$t,v1=" . hmac_sha256_hex("$t.$body", $key);
}

sub post {
    my ($body, $sig, %o) = @_;
    my %h = %{$o{headers} // {}};
    $h{'X-Gift-Signature'} = $sig if defined $sig;
    my $url = $o{url} // "http://127.0.0.1:$port/gift";
    $h{'Content-Type'} //= 'application/json';
    # a fresh connection each time: a reused one waits for delayed ACKs
    my $res = HTTP::Tiny->new(timeout => 10, keep_alive => 0)->request('POST',
        $url, { content => $body, headers => \%h });
    push @answers, $res->{content} // '';
    my $d = eval { $JSON->decode($res->{content}) };
    return ($res->{status}, $d // $res->{content}, $res);
}

sub accepted {
    my ($name, $body, $sig, %o) = @_;
    my ($st, $d) = post($body, $sig, %o);
    my $ok = is($st, 202, "$name: 202");
    $ok &&= ok(ref $d && !$d->{duplicate}, "$name: stored, not a duplicate");
    diag explain $d unless $ok;
    $good{$d->{id}} = $d->{seq} if $st == 202 && ref $d;
    return $d;
}

sub refused {
    my ($name, $body, $sig, $code, %o) = @_;
    my ($st, $d, $res) = post($body, $sig, %o);
    my $status = $o{status} // 401;
    my $ok = is($st, $status, "$name: $status");
    $ok &&= is(ref $d && $d->{error}, $code, "$name: $code");
    $ok &&= ok(!exists $d->{field}, "$name: no field");
    $ok &&= like($res->{headers}{'content-type'} // '', qr{^application/json},
        "$name: JSON answer");
    diag explain $d unless $ok;
    return $d;
}

# ------------------------------------------------------------ rotation

my $b1 = body();
my $s1 = sig($K1, $b1);
my $d1 = accepted('signed with the old key', $b1, $s1);
my $b2 = body();
accepted('signed with the new key', $b2, sig($K2, $b2));

# ------------------------------------------------------------ replay

{
    my ($st, $d) = post($b1, $s1);
    is($st, 202, 'replay within the window: 202');
    is_deeply($d, { id => $d1->{id}, seq => $d1->{seq},
        duplicate => JSON::PP::true }, 'replay: duplicate, same seq');

    # without eventId the id comes from the content: a replay is caught too
    my $b = body(eventId => undef);
    my $s = sig($K2, $b);
    my $d0 = accepted('signed, without eventId', $b, $s);
    ($st, $d) = post($b, $s);
    is_deeply([$st, $d], [202, { id => $d0->{id}, seq => $d0->{seq},
        duplicate => JSON::PP::true }], 'replay without eventId: duplicate');
    ($st, $d) = post($b, sig($K1, $b, time - 5));
    is_deeply([$st, $d], [202, { id => $d0->{id}, seq => $d0->{seq},
        duplicate => JSON::PP::true }],
        'the same body signed again (other t, other key): duplicate');
}

# ------------------------------------------------------------ 401s

my $b = body();
refused('no signature', $b, undef, 'signature_missing');
refused('empty signature header', $b, '', 'signature_missing');
refused('wrong key', $b, sig('not-the-key', $b), 'signature_invalid');
refused('a key that is a prefix of the real one', $b,
    sig(substr($K1, 0, -1), $b), 'signature_invalid');
{
    (my $t = $b) =~ s/"diamond":10/"diamond":99/ or die;
    refused('tampered body', $t, sig($K1, $b), 'signature_invalid');
    refused('body with a byte added', "$b ", sig($K1, $b),
        'signature_invalid');
    refused('body signed for another t', $b,
        't=' . (time - 1) . ',v1=' . (sig($K1, $b) =~ s/.*v1=//r),
        'signature_invalid');
}
{
    my $t = time;
    my $mac = hmac_sha256_hex("$t.$b", $K1);
    for my $c (
        ['garbage', 'garbage'],
        ['no t', "v1=$mac"],
        ['no v1', "t=$t"],
        ['t not digits', "t=abc,v1=$mac"],
        ['t of 13 digits', "t=000$t,v1=$mac"],
        ['t twice', "t=$t,t=$t,v1=$mac"],
        ['v1 of 63 hex digits', "t=$t,v1=" . substr($mac, 1)],
        ['v1 of 65 hex digits', "t=$t,v1=${mac}0"],
        ['v1 not hex', "t=$t,v1=" . ('g' x 64)],
        ['semicolons', "t=$t;v1=$mac"],
        ['empty element', "t=$t,,v1=$mac"],
        ['trailing comma', "t=$t,v1=$mac,"],
        ['upper-case key T', "T=$t,v1=$mac"],
        ['key with a symbol', "t=$t,v-1=x,v1=$mac"],
        ['nine v1', "t=$t" . ",v1=$mac" x 9],
        ['longer than 1024 bytes', "t=$t,v1=$mac,pad=" . ('a' x 1000)],
        ['v1 of another scheme (sha1 length)', "t=$t,v1=" . ('a' x 40)],
    )
    {
        refused("malformed header: $c->[0]", $b, $c->[1],
            'signature_invalid');
    }

    # what the parser accepts
    my $g = body();
    my $gm = hmac_sha256_hex("$t.$g", $K2);
    accepted('two v1, the second one right', $g,
        "t=$t,v1=" . ('0' x 64) . ",v1=$gm");
    $g = body();
    accepted('upper-case hex', $g, "t=$t,v1=" . uc hmac_sha256_hex("$t.$g",
        $K1));
    $g = body();
    accepted('spaces around elements, unknown key skipped', $g,
        " v0=abc , t=$t ,\tv1=" . hmac_sha256_hex("$t.$g", $K1) . ' ');
    $g = body();
    accepted('t with a leading zero, MACed as sent', $g,
        "t=0$t,v1=" . hmac_sha256_hex("0$t.$g", $K1));
}

# ------------------------------------------------------------ the window

{
    my $now = time;
    refused('stale t (window + 100 s)', $b, sig($K1, $b, $now - 400),
        'signature_expired');
    refused('stale t (window + 10 s), new key', $b, sig($K2, $b, $now - 310),
        'signature_expired');
    refused('future t (window + 100 s)', $b, sig($K2, $b, $now + 400),
        'signature_expired');
    refused('future t (window + 10 s)', $b, sig($K1, $b, $now + 310),
        'signature_expired');
    refused('t = 0', $b, sig($K1, $b, 0), 'signature_expired');
    refused('stale and wrong key: invalid, not expired', $b,
        sig('nope', $b, $now - 400), 'signature_invalid');
    my $g = body();
    accepted('t 290 s old (inside the window)', $g, sig($K1, $g, $now - 290));
    # into the future only gift_webhook_signature_skew (30 s by default)
    refused('t 290 s ahead (inside the window, past the 30 s skew)', $b,
        sig($K2, $b, $now + 290), 'signature_expired');
    $g = body();
    accepted('t 20 s ahead (inside the skew)', $g, sig($K2, $g, $now + 20));

    # gift_webhook_signature_window 10s
    my $short = "http://127.0.0.1:$port/gift-short";
    refused('10 s window: 60 s old', $b, sig($K1, $b, $now - 60),
        'signature_expired', url => $short);
    refused('10 s window: 60 s ahead', $b, sig($K1, $b, $now + 60),
        'signature_expired', url => $short);
    refused('10 s window: the other location\'s second key', $b,
        sig($K2, $b), 'signature_invalid', url => $short);
    $g = body();
    accepted('10 s window: fresh', $g, sig($K1, $g), url => $short);
}

# ------------------------------------------------------------ order of checks

refused('unsigned invalid JSON: the signature first', '{"event":', undef,
    'signature_missing');
refused('signed invalid JSON: 400', '{"event":', sig($K1, '{"event":'),
    'invalid_json', status => 400);
{
    my $g = body(diamond => 0);
    my ($st, $d) = post($g, sig($K1, $g));
    is_deeply([$st, ref $d && @$d{qw(error field)}],
        [422, 'invalid_field', 'diamond'], 'signed invalid field: 422');
}
refused('signed, wrong content type: 415', $b, sig($K1, $b),
    'unsupported_media_type', status => 415,
    headers => { 'Content-Type' => 'text/plain' });

# ------------------------------------------------------------ no secret

{
    my $open = "http://127.0.0.1:$port/gift-open";
    my $g = body();
    accepted('location without a secret: unsigned accepted', $g, undef,
        url => $open);
    $g = body();
    accepted('location without a secret: a bad signature is ignored', $g,
        'garbage', url => $open);
    my @w = GiftTest::slurp($ngx->error_log)
        =~ /(\[warn\].*gift_webhook without gift_webhook_secret.*)/g;
    is(scalar(@w), 1, 'one start-up warning: the one unsigned location')
        or diag explain \@w;
}

# ------------------------------------------------------------ inheritance

{
    my $url = "http://127.0.0.1:$port2/gift";
    my $g = body();
    refused('server-level secret: unsigned', $g, undef, 'signature_missing',
        url => $url);
    refused('server-level secret: another server\'s key', $g, sig($K1, $g),
        'signature_invalid', url => $url);
    accepted('server-level secret: signed', $g, sig($K3, $g), url => $url);
}

# ------------------------------------------------------------ afterwards

my $g = body();
accepted('a final signed gift', $g, sig($K2, $g));

my $info = GiftTest::stream_info($nats->url)->{GIFTS};
is($info->{messages}, scalar(keys %good), 'GIFTS holds the accepted gifts');
my %stored;
for my $s (1 .. ($info->{last_seq} // 0)) {
    my $m = GiftTest::stored($nats->url, 'GIFTS', $s) or next;
    $stored{$m->{event}{eventId}} = $s;
}
is_deeply(\%stored, \%good, 'GIFTS holds exactly the accepted ids');

is($ngx->stop, 0, 'nginx exits cleanly');
my $log = GiftTest::slurp($ngx->error_log)
    . GiftTest::slurp($ngx->dir . '/stderr.log');
like($log, qr/\[debug\]/, 'the error log is at debug level');
for my $k ([old => $K1], [new => $K2], [server => $K3]) {
    ok(index($log, $k->[1]) < 0, "the $k->[0] secret is not in the error log");
    ok(!grep({ index($_, $k->[1]) >= 0 } @answers),
        "the $k->[0] secret is in no answer");
    ok(index($log, $rnd) < 0, "no part of the $k->[0] secret in the log")
        if $k->[0] eq 'old';
}
like($log, qr/signature_invalid/, 'refusals are logged (by code)');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
