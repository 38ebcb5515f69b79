#!/usr/bin/perl
# tls:// on the module's own NATS client (nginx's SSL on the worker's
# connection): against a nats-server with a certificate of a CA this test
# makes, the right CA stores gifts; a wrong CA or a wrong name is refused
# (503 unavailable); mutual TLS (verify: true) with and without a client
# certificate; a TLS server behind a nats:// URL; unreadable files stop
# nginx at start.  giftctl takes the same files.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftNatsAuth;

my $dir = GiftTest::tempdir();
GiftNatsAuth::make_ca($dir, 'ca');
GiftNatsAuth::make_ca($dir, 'other-ca');
GiftNatsAuth::make_cert($dir, 'server', 'ca');
GiftNatsAuth::make_cert($dir, 'client', 'ca', san => 'DNS:gift-client',
    usage => 'clientAuth');
GiftNatsAuth::make_cert($dir, 'stranger', 'other-ca', san => 'DNS:x',
    usage => 'clientAuth');

my $out;

# ------------------------------------------------------------ server TLS
GiftTest::make_path("$dir/n1");
my $nats = GiftNatsAuth::start_nats("$dir/n1", <<"EOF");
tls {
  cert_file: "$dir/server.pem"
  key_file: "$dir/server.key"
  timeout: 2
}
EOF
my $url = 'tls://localhost:' . $nats->port;
my $ipurl = 'tls://127.0.0.1:' . $nats->port;

@GiftTest::GIFTCTL_OPTS = ('--tls-ca', "$dir/ca.pem");
my $rc;
($out, $rc) = GiftTest::giftctl($url, 'setup');
is($rc, 0, 'giftctl --tls-ca: setup over TLS') or diag $out;

@GiftTest::GIFTCTL_OPTS = ('--tls-ca', "$dir/other-ca.pem");
($out, $rc) = GiftTest::giftctl($url, 'info');
isnt($rc, 0, 'giftctl with the wrong CA is refused');
@GiftTest::GIFTCTL_OPTS = ('--tls-ca', "$dir/ca.pem");

sub nginx_with {
    my ($nurl, $http) = @_;
    return GiftTest::start_nginx(nats_url => $nurl, workers => 1,
        http => $http);
}

sub connected {
    my ($ngx) = @_;
    return GiftTest::wait_until(15, sub {
        GiftTest::slurp($ngx->error_log) =~ /connected to NATS \S+ over TLS/
    });
}

# --- the right CA, the name from the URL: gifts are stored
my $ngx = nginx_with($url,
    "gift_nats_ssl_trusted_certificate $dir/ca.pem;");
ok(connected($ngx), 'tls:// with the right CA: connected over TLS');
my ($st, $body) = GiftTest::post_gift($ngx->port,
    GiftTest::gift(eventId => 'tls-1'));
is($st, 202, 'gift accepted over TLS');
my $m = GiftTest::stored($url, 'GIFTS', $body->{seq} // 0);
is($m && $m->{event}{eventId}, 'tls-1', '... and stored in GIFTS');
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

# --- an address in the URL, the certificate's name given
$ngx = nginx_with($ipurl, "gift_nats_ssl_trusted_certificate $dir/ca.pem;"
    . ' gift_nats_ssl_name localhost;');
ok(connected($ngx), 'tls://127.0.0.1 with gift_nats_ssl_name localhost');
($st) = GiftTest::post_gift($ngx->port, GiftTest::gift(eventId => 'tls-2'));
is($st, 202, '... gift accepted');
$ngx->stop;

# --- a wrong CA: refused, 503 unavailable
$ngx = nginx_with($url,
    "gift_nats_ssl_trusted_certificate $dir/other-ca.pem;");
ok(GiftTest::wait_until(15, sub { GiftTest::slurp($ngx->error_log)
    =~ /certificate is not trusted/ }), 'a wrong CA: the certificate is '
    . 'not trusted (logged)');
($st, $body) = GiftTest::post_gift($ngx->port,
    GiftTest::gift(eventId => 'tls-3'));
is($st, 503, '... the webhook answers 503');
is($body->{error}, 'unavailable', '... unavailable');
unlike(GiftTest::slurp($ngx->error_log), qr/connected to NATS/,
    '... never connected');
$ngx->stop;

# --- a wrong name: refused
$ngx = nginx_with($url, "gift_nats_ssl_trusted_certificate $dir/ca.pem;"
    . ' gift_nats_ssl_name nats.example.org;');
ok(GiftTest::wait_until(15, sub { GiftTest::slurp($ngx->error_log)
    =~ /does not match "nats\.example\.org"/ }),
    'a wrong name: the certificate does not match (logged)');
($st, $body) = GiftTest::post_gift($ngx->port,
    GiftTest::gift(eventId => 'tls-4'));
is("$st $body->{error}", '503 unavailable', '... 503 unavailable');
$ngx->stop;

# --- verification off: the wrong CA is accepted (the directive works)
$ngx = nginx_with($url, "gift_nats_ssl_trusted_certificate "
    . "$dir/other-ca.pem; gift_nats_ssl_verify off;");
ok(connected($ngx), 'gift_nats_ssl_verify off: connected with a wrong CA');
$ngx->stop;

# --- a TLS server behind a nats:// URL
$ngx = nginx_with('nats://127.0.0.1:' . $nats->port, '');
ok(GiftTest::wait_until(15, sub { GiftTest::slurp($ngx->error_log)
    =~ /requires TLS: use a tls:\/\/ URL/ }),
    'nats:// to a TLS server: "requires TLS" logged');
($st, $body) = GiftTest::post_gift($ngx->port, GiftTest::gift());
is("$st $body->{error}", '503 unavailable', '... 503 unavailable');
$ngx->stop;
$nats->stop;

# ------------------------------------------------------------ mutual TLS
GiftTest::make_path("$dir/n2");
$nats = GiftNatsAuth::start_nats("$dir/n2", <<"EOF");
tls {
  cert_file: "$dir/server.pem"
  key_file: "$dir/server.key"
  ca_file: "$dir/ca.pem"
  verify: true
  timeout: 2
}
EOF
$url = 'tls://localhost:' . $nats->port;

($out, $rc) = GiftTest::giftctl($url, 'info');
isnt($rc, 0, 'mutual TLS: giftctl without a client certificate is refused');
@GiftTest::GIFTCTL_OPTS = ('--tls-ca', "$dir/ca.pem", '--tls-cert',
    "$dir/client.pem", '--tls-key', "$dir/client.key");
($out, $rc) = GiftTest::giftctl($url, 'setup');
is($rc, 0, 'giftctl --tls-cert/--tls-key: setup') or diag $out;

chmod 0600, "$dir/client.key";
$ngx = nginx_with($url, "gift_nats_ssl_trusted_certificate $dir/ca.pem;"
    . " gift_nats_ssl_certificate $dir/client.pem;"
    . " gift_nats_ssl_certificate_key $dir/client.key;");
ok(connected($ngx), 'mutual TLS with a client certificate: connected');
($st, $body) = GiftTest::post_gift($ngx->port,
    GiftTest::gift(eventId => 'mtls-1'));
is($st, 202, '... gift accepted');
$m = GiftTest::stored($url, 'GIFTS', $body->{seq} // 0);
is($m && $m->{event}{eventId}, 'mtls-1', '... and stored');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
$ngx->stop;

$ngx = nginx_with($url, "gift_nats_ssl_trusted_certificate $dir/ca.pem;");
ok(GiftTest::wait_until(15, sub { GiftTest::slurp($ngx->error_log)
    =~ /NATS not reachable yet/ }), 'without a client certificate: refused');
($st, $body) = GiftTest::post_gift($ngx->port, GiftTest::gift());
is("$st $body->{error}", '503 unavailable', '... 503 unavailable');
$ngx->stop;

$ngx = nginx_with($url, "gift_nats_ssl_trusted_certificate $dir/ca.pem;"
    . " gift_nats_ssl_certificate $dir/stranger.pem;"
    . " gift_nats_ssl_certificate_key $dir/stranger.key;");
ok(GiftTest::wait_until(15, sub { GiftTest::slurp($ngx->error_log)
    =~ /NATS not reachable yet/ }), 'a certificate of another CA: refused');
($st, $body) = GiftTest::post_gift($ngx->port, GiftTest::gift());
is("$st $body->{error}", '503 unavailable', '... 503 unavailable');
$ngx->stop;
$nats->stop;

# ------------------------------------------------------------ bad files
for my $case (
    [ "gift_nats_ssl_trusted_certificate $dir/none.pem;", qr/none\.pem/,
      'a missing CA file' ],
    [ "gift_nats_ssl_certificate $dir/client.pem;"
      . " gift_nats_ssl_certificate_key $dir/none.key;", qr/none\.key/,
      'a missing key file' ],
    [ "gift_nats_ssl_certificate $dir/client.pem;",
      qr/no "gift_nats_ssl_certificate_key"/, 'a certificate without key' ],
    [ "gift_nats_ssl_certificate $dir/ca.key;"
      . " gift_nats_ssl_certificate_key $dir/ca.key;", qr/ca\.key/,
      'a key where the certificate should be' ],
) {
    my ($http, $re, $name) = @$case;
    my $d = GiftTest::tempdir();
    # a tls:// URL: the SSL files are read
    my $ngx = GiftTest::Nginx->new(dir => $d, http => $http,
        nats_url => 'tls://127.0.0.1:4222', workers => 1);
    $ngx->{log_level} = 'info';
    $_ //= '' for @$ngx{qw(main server webhook listen)};
    $ngx->write_conf;
    my $cmd = GiftTest::nginx_env() . "'" . GiftTest::find_bin('nginx')
        . "' -t -p '$d/' -c '$d/nginx.conf' -e '$d/error.log'";
    my $o = `$cmd 2>&1`;
    isnt($? >> 8, 0, "$name: nginx -t fails");
    like($o, $re, '... naming the file') or diag $o;
}

done_testing();
