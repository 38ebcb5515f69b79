package GiftNatsAuth;

# TLS certificates (openssl CLI) and NATS credentials (build/giftnkey) made
# by the tests, and nats-server configurations that require them.

use strict;
use warnings;

use GiftTest;

sub _run {
    my (@cmd) = @_;
    my $cmd = join(' ', map { "'$_'" } @cmd);
    my $out = `$cmd 2>&1`;
    die "failed: $cmd\n$out" if $?;
    return $out;
}

# make_ca($dir, $name): "$dir/$name.pem" and "$dir/$name.key"
sub make_ca {
    my ($dir, $name) = @_;
    _run('openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
        'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', "$dir/$name.key",
        '-out', "$dir/$name.pem", '-days', '2', '-subj', "/CN=$name");
    return "$dir/$name.pem";
}

# make_cert($dir, $name, $ca, san => 'DNS:localhost,IP:127.0.0.1',
# usage => 'serverAuth'): "$dir/$name.pem" and "$dir/$name.key", signed by
# the CA "$dir/$ca.pem".
sub make_cert {
    my ($dir, $name, $ca, %a) = @_;
    my $san = $a{san} // 'DNS:localhost,IP:127.0.0.1';
    my $usage = $a{usage} // 'serverAuth';
    GiftTest::spurt("$dir/$name.ext",
        "subjectAltName=$san\nextendedKeyUsage=$usage\n");
    _run('openssl', 'req', '-newkey', 'ec', '-pkeyopt',
        'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', "$dir/$name.key",
        '-out', "$dir/$name.csr", '-subj', "/CN=$name");
    _run('openssl', 'x509', '-req', '-in', "$dir/$name.csr", '-CA',
        "$dir/$ca.pem", '-CAkey', "$dir/$ca.key", '-CAcreateserial', '-out',
        "$dir/$name.pem", '-days', '2', '-extfile', "$dir/$name.ext");
    return "$dir/$name.pem";
}

sub giftnkey { _run("$GiftTest::BUILD/giftnkey", @_) }

# A new key: (seed, public)
sub nkey {
    my ($type) = @_;
    my ($seed, $pub) = split /\n/, giftnkey('gen', $type);
    return ($seed, $pub);
}

# An operator, an account with JetStream and a user of it; writes
# "$dir/$name.creds" and returns a hash with the JWTs and keys, and the
# nats-server configuration lines for operator mode.
sub operator_mode {
    my ($dir, $name) = @_;
    my ($oseed, $opub) = nkey('operator');
    my ($aseed, $apub) = nkey('account');
    my ($useed, $upub) = nkey('user');
    my (undef, $spub) = nkey('account');
    chomp(my $ojwt = giftnkey('jwt', 'operator', $oseed, 'gift-op'));
    chomp(my $sjwt = giftnkey('jwt', 'system', $oseed, $spub, 'SYS'));
    chomp(my $ajwt = giftnkey('jwt', 'account', $oseed, $apub, 'gift'));
    chomp(my $ujwt = giftnkey('jwt', 'user', $aseed, $upub, $name));
    GiftTest::spurt("$dir/op.jwt", "$ojwt\n");
    GiftTest::spurt("$dir/$name.creds", giftnkey('creds', $ujwt, $useed));
    chmod 0600, "$dir/$name.creds";
    return {
        creds => "$dir/$name.creds",
        account => $apub, account_seed => $aseed,
        conf => "operator: $dir/op.jwt\nsystem_account: $spub\n"
            . "resolver: MEMORY\n"
            . "resolver_preload: {\n  $apub: $ajwt\n  $spub: $sjwt\n}\n",
    };
}

# A user of the account made by operator_mode() (another .creds file).
sub operator_user {
    my ($dir, $op, $name) = @_;
    my ($useed, $upub) = nkey('user');
    chomp(my $ujwt = giftnkey('jwt', 'user', $op->{account_seed}, $upub,
        $name));
    GiftTest::spurt("$dir/$name.creds", giftnkey('creds', $ujwt, $useed));
    return "$dir/$name.creds";
}

# A nats-server with JetStream and the configuration lines given.
sub start_nats {
    my ($dir, $conf) = @_;
    my $port = GiftTest::free_port();
    GiftTest::make_path("$dir/js");
    GiftTest::spurt("$dir/nats.conf", "listen: 127.0.0.1:$port\n"
        . "jetstream { store_dir: \"$dir/js\" }\n$conf\n");
    return GiftTest::Nats->new(dir => $dir, port => $port,
        conf => "$dir/nats.conf")->start;
}

# `nginx -t` on a configuration with these http-level lines: (exit, output)
sub nginx_t {
    my ($dir, $http) = @_;
    my $ngx = GiftTest::Nginx->new(dir => $dir, http => $http,
        nats_url => 'nats://127.0.0.1:4222', workers => 1);
    $ngx->{log_level} = 'info';
    $_ //= '' for @$ngx{qw(main server webhook listen)};
    $ngx->write_conf;
    my $cmd = GiftTest::nginx_env() . "'" . GiftTest::find_bin('nginx')
        . "' -t -p '$dir/' -c '$dir/nginx.conf' -e '$dir/error.log'";
    my $out = `$cmd 2>&1`;
    return ($? >> 8, $out);
}

1;
