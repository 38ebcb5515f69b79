#!/usr/bin/perl
# make install (scripts/install.sh) into a DESTDIR, then use what it put
# there: Debian's /usr/sbin/nginx loads the installed module through the
# installed load_module snippet (prefix-relative, like Debian's
# libnginx-mod-* snippets) and takes a gift (202) into a real nats-server,
# which the installed giftctl reads back; the installed dispatcher accepts
# the installed configuration; the systemd unit passes systemd-analyze
# verify; the installed nginx.conf.example passes nginx -t; the ThingsBoard
# rule chain is well formed and its scripts do what docs/thingsboard.md says.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use lib 't/lib';
use GiftTest;

my $root = GiftTest::root();
my $build = GiftTest::build();
for (qw(ngx_http_gift_module.so gift-dispatcher giftctl)) {
    GiftTest::skip_all_unless(-f "$build/$_", "build/$_ missing (make)");
}

my $tmp = GiftTest::tempdir();
chmod 0711, $tmp;           # nginx's workers (nobody) read the overlay
my $D = abs_path($tmp) . '/root';

sub install {
    my $out = `cd '$root' && DESTDIR='$D' BUILD='$build' scripts/install.sh 2>&1`;
    return ($out, $? >> 8);
}

# ------------------------------------------------------------ install
my ($out, $rc) = install();
is($rc, 0, 'scripts/install.sh into a DESTDIR') or diag $out;

my %files = (
    '/usr/lib/nginx/modules/ngx_http_gift_module.so' => 0644,
    '/usr/share/nginx/modules-available/mod-http-gift.conf' => 0644,
    '/usr/sbin/gift-dispatcher' => 0755,
    '/usr/bin/giftctl' => 0755,
    '/etc/gift/gift-dispatcher.conf' => 0640,
    '/lib/systemd/system/gift-dispatcher.service' => 0644,
    '/usr/lib/sysusers.d/gift-dispatcher.conf' => 0644,
    '/usr/share/gift/web/index.html' => 0644,
    '/usr/share/gift/thingsboard/gift-rule-chain.json' => 0644,
    '/usr/share/doc/gift/nginx.conf.example' => 0644,
    '/usr/share/doc/gift/gift-dispatcher.conf.example' => 0644,
    '/usr/share/doc/gift/README.md' => 0644,
    '/usr/share/doc/gift/thingsboard.md' => 0644,
);
for my $f (sort keys %files) {
    my @st = stat("$D$f");
    ok(@st && ($st[2] & 07777) == $files{$f},
        sprintf('%s (mode %04o)', $f, $files{$f}))
        or diag(@st ? sprintf('mode %04o', $st[2] & 07777) : 'missing');
    like($out, qr/\Q$f\E/, "install.sh says it installed $f");
}
for my $f (map { s{^web/}{}r } glob "$root/web/*") {
    ok(-f "$D/usr/share/gift/web/" . ($f =~ s{.*/}{}r), "overlay: $f");
}
is(GiftTest::slurp("$D/usr/lib/nginx/modules/ngx_http_gift_module.so"),
    GiftTest::slurp("$build/ngx_http_gift_module.so"),
    'the installed module is the built one');
ok(!grep({ -e $_ } glob "$D/usr/lib/nginx/modules/*.new.*"),
    'no temporary file left');

# The snippet: one line, exactly the shape of Debian's own (any installed
# libnginx-mod-* snippet on this machine is compared too).
my $snippet = GiftTest::slurp(
    "$D/usr/share/nginx/modules-available/mod-http-gift.conf");
is($snippet, "load_module modules/ngx_http_gift_module.so;\n",
    'snippet: load_module modules/ngx_http_gift_module.so;');
for my $deb (glob '/usr/share/nginx/modules-available/mod-*.conf') {
    my $s = GiftTest::slurp($deb);
    my $shape = sub { $_[0] =~ s/ngx_\w+_module/MODULE/gr };
    is($shape->($snippet), $shape->($s), "same shape as Debian's $deb");
}

# ------------------------------------------------------------ again: keep the config
GiftTest::spurt("$D/etc/gift/gift-dispatcher.conf",
    GiftTest::slurp("$D/etc/gift/gift-dispatcher.conf")
    . "# local change\n");
my $ino = (stat "$D/usr/lib/nginx/modules/ngx_http_gift_module.so")[1];
($out, $rc) = install();
is($rc, 0, 'a second install') or diag $out;
like(GiftTest::slurp("$D/etc/gift/gift-dispatcher.conf"), qr/# local change\n\z/,
    'an existing /etc/gift/gift-dispatcher.conf is kept');
like($out, qr{keep\s+/etc/gift/gift-dispatcher.conf}, 'and install.sh says so');
isnt((stat "$D/usr/lib/nginx/modules/ngx_http_gift_module.so")[1], $ino,
    'the module is replaced by a rename (a running nginx keeps its copy)');

# ------------------------------------------------------------ the installed programs
my $v = `'$D/usr/sbin/gift-dispatcher' --version 2>&1`;
is($?, 0, "installed gift-dispatcher runs: $v" =~ s/\n//gr);
$out = `'$D/usr/sbin/gift-dispatcher' -t -c '$D/etc/gift/gift-dispatcher.conf' 2>&1`;
is($?, 0, 'gift-dispatcher -t accepts the installed configuration') or diag $out;
$out = `'$D/usr/bin/giftctl' --help 2>&1`;
like($out, qr/usage: giftctl/, 'installed giftctl runs');

# ------------------------------------------------------------ systemd unit
SKIP: {
    my $sa = eval { GiftTest::find_bin('systemd-analyze') };
    GiftTest::skip_unless($sa, 'systemd-analyze not installed', 3);
    # The unit as installed, its binary paths pointed into DESTDIR (verify
    # checks that ExecStart= and friends exist and are executable).
    my $unit = GiftTest::slurp("$D/lib/systemd/system/gift-dispatcher.service");
    (my $u = $unit) =~ s{/usr/sbin/gift-dispatcher}{$D/usr/sbin/gift-dispatcher}g;
    mkdir "$tmp/units";
    GiftTest::spurt("$tmp/units/gift-dispatcher.service", $u);
    my $o = `'$sa' verify --man=no '$tmp/units/gift-dispatcher.service' 2>&1`;
    is($?, 0, 'systemd-analyze verify: exit 0');
    is($o, '', 'systemd-analyze verify: no warning') or diag $o;
    $o = `'$sa' security --offline=yes '$tmp/units/gift-dispatcher.service' 2>&1`;
    my ($exp) = $o =~ /Overall exposure level for \S+: ([\d.]+)/;
    ok(defined $exp && $exp <= 2.0,
        'systemd-analyze security: exposure ' . ($exp // '?') . ' (<= 2.0)')
        or diag $o;
}
my $unit = GiftTest::slurp("$D/lib/systemd/system/gift-dispatcher.service");
like($unit, qr/^User=gift-dispatcher$/m, 'unit: runs as gift-dispatcher');
like($unit, qr/^Restart=on-failure$/m, 'unit: Restart=on-failure');
like($unit, qr/^ExecReload=\/bin\/kill -HUP \$MAINPID$/m, 'unit: reload is SIGHUP');
like($unit, qr/^CPUSchedulingPolicy=batch$/m, 'unit: SCHED_BATCH (not real-time)');

# ------------------------------------------------------------ nginx + the snippet
my $nats = GiftTest::start_nats();
($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

# nginx's prefix is a directory whose modules/ points at the installed
# modules directory, as Debian's /usr/share/nginx/modules points at
# /usr/lib/nginx/modules: the snippet's relative path resolves through it.
my $ngx = GiftTest::Nginx->new(nats_url => $nats->url);
my $d = $ngx->dir;
my $port = $ngx->port;
symlink("$D/usr/lib/nginx/modules", "$d/modules") or die "symlink: $!";
sub conf {
    my ($d, $port) = @_;
    return <<"EOF";
include $D/usr/share/nginx/modules-available/mod-http-gift.conf;
worker_processes 2;
error_log $d/error.log info;
pid $d/nginx.pid;
daemon off;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    gift_nats_url ${\ $nats->url };
    server {
        listen 127.0.0.1:$port;
        location = /gift {
            gift_webhook;
        }
        location / {
            root $D/usr/share/gift/web;
            index index.html;
            include /etc/nginx/mime.types;
        }
    }
}
EOF
}
$ngx->{conf} = conf($d, $port);
$ngx->start;
my $maps = GiftTest::slurp("/proc/" . $ngx->pid . "/maps");
like($maps, qr{\Q$D\E/usr/lib/nginx/modules/ngx_http_gift_module\.so},
    "Debian's nginx mapped the installed module, through the installed snippet");
ok(GiftTest::wait_until(10, sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
    @n >= 2;
}), 'both workers connected to NATS');
my $g = GiftTest::gift();
my ($st, $res) = GiftTest::post_gift($port, $g);
is($st, 202, 'POST /gift: 202') or diag explain $res;
$out = `'$D/usr/bin/giftctl' -s '${\ $nats->url }' get GIFTS $res->{seq} 2>&1`;
like($out, qr/"eventId":"\Q$g->{eventId}\E"/,
    'the installed giftctl reads the gift back from GIFTS');
my $http = HTTP::Tiny->new(timeout => 5);
my $r = $http->get($ngx->url('/'));
is($r->{status}, 200, 'GET /: the installed overlay');
is($r->{content}, GiftTest::slurp("$root/web/index.html"),
    'the overlay page is web/index.html');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
is($ngx->stop, 0, 'nginx exits cleanly');

# Without the modules/ link, the same snippet fails: it is the snippet,
# resolved against nginx's prefix, that loaded the module above.
my $d2 = "$tmp/noprefix";
mkdir $d2; mkdir "$d2/tmp";
GiftTest::spurt("$d2/nginx.conf", conf($d2, GiftTest::free_port()));
$out = `'${\ GiftTest::find_bin('nginx') }' -t -p '$d2/' -c '$d2/nginx.conf' -e '$d2/error.log' 2>&1`;
isnt($?, 0, 'with another prefix the snippet does not load');
like($out, qr{\Q$d2\E/modules/ngx_http_gift_module\.so}, '(it is prefix-relative)')
    or diag $out;

# ------------------------------------------------------------ nginx.conf.example as installed
my $ex = GiftTest::slurp("$D/usr/share/doc/gift/nginx.conf.example");
$ex =~ s{/usr/lib/nginx/modules/}{$D/usr/lib/nginx/modules/}g;
$ex =~ s{/usr/share/gift/web}{$D/usr/share/gift/web}g;
$ex =~ s{^error_log\s+\S+}{error_log $tmp/ex-error.log}m;
$ex =~ s{^pid\s+\S+;}{pid $tmp/ex.pid;}m;
GiftTest::spurt("$tmp/example.conf", $ex);
$out = `${\ GiftTest::nginx_env() }'${\ GiftTest::find_bin('nginx') }' -t -c '$tmp/example.conf' -e '$tmp/ex-t.log' 2>&1`;
is($?, 0, 'the installed nginx.conf.example passes nginx -t with the installed module')
    or diag $out;

# ------------------------------------------------------------ ThingsBoard rule chain
my $rc_json = GiftTest::slurp("$D/usr/share/gift/thingsboard/gift-rule-chain.json");
my $chain = eval { $GiftTest::JSON->decode($rc_json) };
ok($chain, 'gift-rule-chain.json is JSON') or diag $@;
my @nodes = @{$chain->{metadata}{nodes} // []};
my @conns = @{$chain->{metadata}{connections} // []};
is($chain->{ruleChain}{type}, 'CORE', 'a CORE rule chain export');
ok(!grep({ $_->{fromIndex} > $#nodes || $_->{toIndex} > $#nodes } @conns),
    'every connection joins two nodes');
# Follow the happy path from the first node.
my %next;
push @{$next{$_->{fromIndex}}{$_->{type}}}, $_->{toIndex} for @conns;
my @path;
my $i = $chain->{metadata}{firstNodeIndex};
for my $rel ('RPC Request from Device', 'Success', 'True', 'Success',
    'Success', undef)
{
    push @path, $nodes[$i]{type} =~ s/.*\.//r;
    last unless defined $rel;
    $i = $next{$i}{$rel}[0] // last;
}
is_deeply(\@path, [qw(TbMsgTypeSwitchNode TbTransformMsgNode TbJsFilterNode
    TbChangeOriginatorNode TbSendRPCRequestNode TbSendRPCReplyNode)],
    'switch -> pick target -> filter -> change originator -> rpc call request'
    . ' -> rpc call reply (t/65 checks the rest)');
my ($err) = grep { $nodes[$_]{name} eq 'Error reply' } 0 .. $#nodes;
for my $n (1 .. 4) {
    my $rel = $nodes[$n]{type} =~ /Filter/ ? 'False' : 'Failure';
    is($next{$n}{$rel}[0], $err, "$nodes[$n]{name}: $rel -> Error reply");
}
SKIP: {
    my $node = eval { GiftTest::find_bin('node') };
    GiftTest::skip_unless($node, 'node not found', 1);
    # The scripts (JS flavour; the TBEL copy is the same text) on the
    # messages ThingsBoard would hand them.
    GiftTest::spurt("$tmp/scripts.mjs", <<'EOF');
import fs from 'node:fs';
const chain = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const by = (n) => chain.metadata.nodes.find((x) => x.name === n).configuration;
const run = (n, msg, md) => {
    const c = by(n);
    if (c.jsScript !== c.tbelScript) throw new Error(`${n}: JS and TBEL differ`);
    return new Function('msg', 'metadata', 'msgType', c.jsScript)(msg, md, 'TO_SERVER_RPC_REQUEST');
};
const req = { method: 'rotate', params: { deviceId: 'motor_01', rounds: 10, events: [{ id: 'e1', rounds: 10 }] } };
const md = { deviceName: 'gift-dispatcher-1', requestId: '7', serviceId: 's', sessionId: 'u' };
const out = [];
const p = run('Pick target device', req, { ...md });
out.push([p.metadata.giftTarget, p.metadata.giftDispatcher, p.msg === req]);
out.push([run('Has a target?', req, p.metadata), run('Has a target?', {}, { ...md })]);
const q = run('Pick target device', { method: 'rotate', params: {} }, { ...md });
out.push([q.metadata.giftTarget === undefined]);
out.push([run('Error reply', { error: 'TIMEOUT' }, p.metadata).msg,
          run('Error reply', req, { ...p.metadata, giftTarget: 'motor_99' }).msg,
          run('Error reply', { method: 'rotate', params: {} }, q.metadata).msg]);
console.log(JSON.stringify(out));
EOF
    my $o = `'$node' '$tmp/scripts.mjs' '$D/usr/share/gift/thingsboard/gift-rule-chain.json' 2>&1`;
    my $got = eval { $GiftTest::JSON->decode($o) };
    is_deeply($got, [
        ['motor_01', 'gift-dispatcher-1', JSON::PP::true],
        [JSON::PP::true, JSON::PP::false],
        [JSON::PP::true],
        [{ ok => JSON::PP::false, error => 'TIMEOUT' },
         { ok => JSON::PP::false, error => 'no device named motor_99' },
         { ok => JSON::PP::false, error => 'bad request: params.deviceId missing' }],
    ], 'rule chain scripts: target and dispatcher kept in metadata; errors '
        . 'become {"ok":false,"error":...}') or diag $o;
}

$nats->stop;
done_testing();
