#!/usr/bin/perl
# NATS credentials, each against a nats-server that requires it: a token
# (gift_nats_token, or token@ in the URL), user:password@ in the URL, an
# NKey user (gift_nats_nkey: the client signs the server's nonce) and JWT
# credentials (gift_nats_credentials, an operator-mode server whose
# operator, account and user JWTs the test makes with giftnkey).  The right
# credential stores gifts, a wrong one gets 503 unavailable; giftctl and
# the dispatcher take the same forms; unreadable key files stop nginx at
# start with the file and the reason.  Key files are 0600: the master reads
# them, the workers (an unprivileged user) need not.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftNatsAuth;

my $dir = GiftTest::tempdir();
my $mq = GiftDispatch::start_mosquitto(dir => $dir);

sub seed_file {
    my ($name, $seed) = @_;
    GiftTest::spurt("$dir/$name", "# an NKey seed\n$seed\n");
    chmod 0600, "$dir/$name";
    return "$dir/$name";
}

# case(name, server conf, url for the right credential, nginx http lines,
#      giftctl options, dispatcher nats settings, [wrong url, wrong http])
sub case {
    my (%c) = @_;
    my $d = "$dir/$c{name}";
    GiftTest::make_path($d);
    my $nats = GiftNatsAuth::start_nats($d, $c{server});
    my $port = $nats->port;
    (my $url = $c{url}) =~ s/PORT/$port/;

    @GiftTest::GIFTCTL_OPTS = @{$c{giftctl} // []};
    my ($out, $rc) = GiftTest::giftctl($url, 'setup');
    is($rc, 0, "$c{name}: giftctl setup") or diag $out;

    my $ngx = GiftTest::start_nginx(dir => "$d/ngx", nats_url => $url,
        http => $c{http} // '', workers => 1);
    ok(GiftTest::wait_until(15, sub {
        GiftTest::slurp($ngx->error_log) =~ /connected to NATS/
    }), "$c{name}: nginx connected");
    my ($st, $body) = GiftTest::post_gift($ngx->port,
        GiftTest::gift(eventId => "$c{name}-1"));
    is($st, 202, "$c{name}: gift accepted");
    my $m = GiftTest::stored($url, 'GIFTS', $body->{seq} // 0);
    is($m && $m->{event}{eventId}, "$c{name}-1", "$c{name}: ... and stored");
    is_deeply([$ngx->bad_log_lines], [], "$c{name}: no [alert] or [emerg]");
    $ngx->stop;

    # the wrong credential: refused by the server, 503 at the webhook
    (my $wurl = $c{wrong_url} // $c{url}) =~ s/PORT/$port/;
    $ngx = GiftTest::start_nginx(dir => "$d/ngx-wrong", nats_url => $wurl,
        http => $c{wrong_http} // '', workers => 1);
    ok(GiftTest::wait_until(15, sub {
        GiftTest::slurp($ngx->error_log) =~ /Authorization Violation/i
    }), "$c{name}: a wrong credential is refused (Authorization Violation)");
    ($st, $body) = GiftTest::post_gift($ngx->port, GiftTest::gift());
    is("$st " . ($body->{error} // ''), '503 unavailable',
        "$c{name}: ... 503 unavailable");
    $ngx->stop;

    # the dispatcher, with the same credential
    my $disp = GiftDispatch::start_dispatcher(dir => $d, nats_url => $url,
        mqtt_port => $mq->port, extra_nats => $c{dispatcher} // '');
    like($disp->log_text, qr/NATS: connected to/,
        "$c{name}: the dispatcher connected");
    $disp->stop;

    $nats->stop;
}

# --- token
case(name => 'token',
    server => "authorization { token: \"gift-t0ken\" }",
    url => 'nats://127.0.0.1:PORT',
    http => 'gift_nats_token gift-t0ken;',
    giftctl => [ '--token', 'gift-t0ken' ],
    dispatcher => 'token = "gift-t0ken";',
    wrong_http => 'gift_nats_token wrong-token;');

# --- user and password in the URL
case(name => 'userpass',
    server => "authorization { users: [ { user: gift, password: "
        . "\"s3cret-pass\" } ] }",
    url => 'nats://gift:s3cret-pass@127.0.0.1:PORT',
    wrong_url => 'nats://gift:wrong@127.0.0.1:PORT');

# --- an NKey user
my ($seed, $pub) = GiftNatsAuth::nkey('user');
my ($wseed) = GiftNatsAuth::nkey('user');
my $nk = seed_file('user.nk', $seed);
my $wnk = seed_file('wrong.nk', $wseed);
case(name => 'nkey',
    server => "authorization { users: [ { nkey: $pub } ] }",
    url => 'nats://127.0.0.1:PORT',
    http => "gift_nats_nkey $nk;",
    giftctl => [ '--nkey', $nk ],
    dispatcher => "nkey = \"$nk\";",
    wrong_http => "gift_nats_nkey $wnk;");

# --- JWT credentials, operator mode
GiftTest::make_path("$dir/keys");
my $op = GiftNatsAuth::operator_mode("$dir/keys", 'gift-nginx');
my $op2 = GiftNatsAuth::operator_mode("$dir/keys2", 'stranger')
    if GiftTest::make_path("$dir/keys2");
case(name => 'creds',
    server => $op->{conf},
    url => 'nats://127.0.0.1:PORT',
    http => "gift_nats_credentials $op->{creds};",
    giftctl => [ '--creds', $op->{creds} ],
    dispatcher => "creds = \"$op->{creds}\";",
    wrong_http => "gift_nats_credentials $op2->{creds};");

# --- files that cannot be read or parsed stop nginx at start
GiftTest::spurt("$dir/garbage.nk", "not a seed\n");
GiftTest::spurt("$dir/nojwt.creds", "-----BEGIN USER NKEY SEED-----\n"
    . "$seed\n------END USER NKEY SEED------\n");
my ($aseed) = GiftNatsAuth::nkey('account');
my $ank = seed_file('account.nk', $aseed);
# one character in the middle of the key (the last one may only carry
# padding bits, which leaves the checksum right)
(my $bad = $seed) =~ s/^(.{20})(.)/$1 . ($2 eq 'A' ? 'B' : 'A')/e;
my $bnk = seed_file('badsum.nk', $bad);
for my $t (
    [ "gift_nats_nkey $dir/none.nk;", qr/none\.nk.*No such file/,
      'a missing seed file' ],
    [ "gift_nats_nkey $dir/garbage.nk;", qr/garbage\.nk.*no NKey seed/,
      'a file without a seed' ],
    [ "gift_nats_nkey $bnk;", qr/badsum\.nk.*checksum/,
      'a seed with a wrong checksum' ],
    [ "gift_nats_nkey $ank;", qr/account\.nk.*not a user/,
      "an account's seed" ],
    [ "gift_nats_credentials $dir/nojwt.creds;",
      qr/nojwt\.creds.*BEGIN NATS USER JWT/, 'a .creds file without a JWT' ],
    [ "gift_nats_nkey $nk; gift_nats_credentials $op->{creds};",
      qr/is duplicate/, 'an NKey and credentials together' ],
) {
    my ($http, $re, $name) = @$t;
    my $d = GiftTest::tempdir();
    my ($rc, $out) = GiftNatsAuth::nginx_t($d, $http);
    isnt($rc, 0, "$name: nginx -t fails");
    like($out, $re, '... naming the file and the reason') or diag $out;
}

# --- credentials rotated under a running dispatcher: the server refuses
# its reconnection and cnats closes the connections for good; the
# dispatcher does not idle forever but stops and exits 1, naming the
# reason, for its supervisor to start it again
{
    my $d = GiftTest::tempdir();
    my $nats = GiftNatsAuth::start_nats($d, 'authorization { token: "gift-t0ken" }');
    my $url = 'nats://127.0.0.1:' . $nats->port;
    my $disp = GiftDispatch::start_dispatcher(dir => $d, nats_url => $url,
        mqtt_port => $mq->port, extra_nats => 'token = "gift-t0ken";');
    ok(GiftTest::wait_until(15, sub {
        $disp->log_text =~ /lease: now the active dispatcher/ }, 0.1),
        'rotation: the dispatcher runs');
    $nats->stop;
    my $conf = GiftTest::slurp("$d/nats.conf");
    $conf =~ s/gift-t0ken/rotated-t0ken/;
    GiftTest::spurt("$d/nats.conf", $conf);
    $nats->start;
    ok(GiftTest::wait_until(30, sub { !GiftTest::alive($disp->pid) }, 0.1),
        'rotation: refused on reconnecting, the dispatcher stops')
        or diag $disp->log_text;
    $disp->stop('TERM', 5);
    like($disp->log_text, qr/NATS: the \w+ connection was closed for good \(Authorization Violation\)/,
        '... saying why');
    like($disp->log_text, qr/exiting \(1\)\s*\z/, '... exit status 1');
    $nats->stop;
}

done_testing();
