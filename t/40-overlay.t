#!/usr/bin/perl
# The overlay page (web/) in a real browser: Debian's Chromium, driven by
# playwright-core through t/browser/driver.mjs.  nginx serves the page and
# /gift/events; acknowledgements are published into GIFT_ACKS as the
# dispatcher would (and, when build/gift-dispatcher exists, also through the
# whole chain: POST /gift -> dispatcher -> the ThingsBoard stand-in and its
# motors; GIFT_TB=tbsim: tbsim on mosquitto).
#
# What a viewer would check: who sent what, rounds, device, status (dead
# letters with their reason), latency; per-device totals; names shown as
# text, never as markup; the connection's state and last id; a reload of
# nginx drops the stream and the page resumes without losing or repeating
# what was published meanwhile; the gap notice; the feed cap; filters; the
# transparent OBS mode; a readable layout at 1920x1080 and on a phone.
# Screenshots: build/overlay-1920.png, overlay-phone.png,
# overlay-transparent.png.

use strict;
use warnings;
use Test::More;
use HTTP::Tiny;
use IO::Select;
use IPC::Open2 qw(open2);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftStream;
use GiftBrowser;

my $ROOT = GiftTest::root();
my $BUILD = GiftTest::build();
my $JSON = JSON::PP->new->canonical->utf8;
my $T0 = time;

sub which {
    my ($name) = @_;
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$name" if -x "$d/$name";
    }
    return undef;
}

my $node = which('node');
GiftTest::skip_all_unless($node, 'node not found: the overlay test drives '
    . 'Chromium with playwright-core (Node.js)');
my $chromium = $ENV{GIFT_CHROMIUM} // '/usr/bin/chromium';
GiftTest::skip_all_unless(-x $chromium, "$chromium not found: run "
    . "'make deps' (Debian package chromium)");

# playwright-core and ws, as package-lock.json pins them
if (!-f "$ROOT/node_modules/playwright-core/package.json") {
    my $npm = which('npm');
    GiftTest::skip_all_unless($npm, 'node_modules/ missing and npm not found');
    diag 'node_modules/playwright-core missing: npm ci';
    system("cd '$ROOT' && npm ci --no-audit --no-fund 1>&2") == 0
        or BAIL_OUT('npm ci failed');
}

# Bounded by make test's limit per file (scripts/test-file.sh), and the
# driver's own watchdog: END blocks stop the driver (which closes Chromium)
# and GiftTest's servers.

# ------------------------------------------------------------ servers

my $nats = GiftTest::start_nats();
GiftTest::giftctl($nats->url, 'setup');

# The page's location as nginx.conf.example should have it: static files
# with their MIME types (without a types block nginx sends CSS and JS as
# text/plain, and Chromium refuses such a stylesheet).
my $web = <<"EOF";
location / {
            root $ROOT/web;
            index index.html;
            types {
                text/html html;
                text/css css;
                text/javascript js;
            }
        }
        location = /gift/events {
            gift_sse;
            gift_sse_retry 3s;
        }
EOF
my $ngx = GiftTest::start_nginx(
    nats_url => $nats->url,
    http => 'gift_sse_heartbeat 1s; gift_sse_replay_max 8;',
    server => $web,
);
my $following = sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /following GIFT_ACKS/g;
    scalar @n;
};
ok(GiftTest::wait_until(10, sub { $following->() >= 2 }),
    'both workers follow GIFT_ACKS');

my $http = HTTP::Tiny->new(timeout => 5);
for (['/', qr{^text/html}], ['/overlay.css', qr{^text/css}],
    ['/overlay.js', qr{^(text|application)/javascript}])
{
    my ($path, $type) = @$_;
    my $res = $http->get($ngx->url($path));
    ok($res->{status} == 200
        && ($res->{headers}{'content-type'} // '') =~ $type,
        "GET $path: 200, $res->{headers}{'content-type'}")
        or diag "$res->{status} " . ($res->{headers}{'content-type'} // '');
}

{
    # make run serves the page with nginx.conf.example's own location /
    my $ex = GiftTest::slurp("$ROOT/nginx.conf.example");
    my ($loc) = $ex =~ /^\s*location \/ \{(.*?)^\s*\}/ms;
    ok(defined $loc && $loc =~ /^\s*(types\s*\{|include\s+\S*mime\.types)/m,
        'nginx.conf.example: location / gives CSS and JS their MIME types');
}

# ------------------------------------------------------------ browser

my $browser = GiftBrowser->start($node, "$ROOT/t/browser/driver.mjs");
ok($browser, 'Chromium started (' . ($browser->{version} // '?') . ')');

my $nc = GiftStream::nats_connect($nats->port);
my (%sent, $n);     # seq => the acknowledgement as published
sub ack {
    my (%a) = @_;
    $n++;
    my $now = int(time * 1000);
    my %ack = (eventId => "ov$$-$n", deviceId => 'motor_01', rounds => 10,
        status => 'ok', attempts => 1, platform => 'tiktok',
        roomId => 'room_a', userId => "u$n", userName => "Viewer $n",
        giftName => 'Motor', diamond => 10, quantity => 1,
        completedAtMs => $now, receivedAtMs => $now - 12, %a);
    my $pa = $nc->publish_ack(%ack);
    die "no seq" unless $pa->{seq};
    $sent{$pa->{seq}} = \%ack;
    return $pa->{seq};
}

# Poll what the page shows until $cond holds; returns the last view.
sub wait_view {
    my ($timeout, $cond) = @_;
    my $v;
    GiftTest::wait_until($timeout, sub {
        $v = $browser->view;
        $cond->($v);
    }, 0.1);
    return $v;
}

sub seqs { [map { $_->{seq} } @{$_[0]{feed}}] }
sub totals { +{ map { $_->{device} => [@$_{qw(rounds gifts failed)}] }
    @{$_[0]{totals}} } }

# Totals as the page should count them: rounds and gifts of ok
# acknowledgements, dead letters apart.
sub expected_totals {
    my %t;
    for my $s (@_) {
        my $a = $sent{$s};
        my $t = $t{$a->{deviceId}} //= [0, 0, 0];
        if ($a->{status} eq 'dead_letter') {
            $t->[2]++;
        } else {
            $t->[0] += $a->{rounds};
            $t->[1]++;
        }
    }
    return { map { $_ => [map { "$_" } @{$t{$_}}] } keys %t };
}

my $base = $ngx->url('/');

# ------------------------------------------------------------ the feed

my $r = $browser->cmd(goto => url => $base, width => 1920, height => 1080);
is($r->{status}, 200, 'page loads');
my $v = wait_view(10, sub { $_[0]{state} eq 'live' });
is($v->{state}, 'live', 'connection state: live');
is_deeply($v->{feed}, [], 'feed empty at first');

my $hostile = '<img src=x onerror="window.__pwned=1">';
my @s1 = (
    ack(userName => 'Alice', deviceId => 'motor_01', rounds => 10),
    ack(userName => 'Bob', deviceId => 'motor_02', giftName => 'Rose',
        diamond => 1, quantity => 5, rounds => 5, roundsRequested => 50000,
        capped => 1),
    ack(userName => $hostile, giftName => '<b>Lion</b>',
        deviceId => 'motor_01', quantity => 2, rounds => 20),
    ack(userName => '', userId => 'user_777', deviceId => 'motor_02',
        rounds => 3, status => 'dead_letter', reason => 'timeout',
        attempts => 5),
    ack(userName => "Zo\x{eb} \x{202e}lived", deviceId => 'motor_03',
        rounds => 7, giftName => 'Perfume', quantity => 7, diamond => 1),
    ack(userName => 'Alice', deviceId => 'motor_01', rounds => 0,
        quantity => 2),
);
$v = wait_view(10, sub { @{$_[0]{feed}} >= 6 });
is_deeply(seqs($v), [reverse @s1], 'six acknowledgements, newest first')
    or diag explain $v->{feed};
my %e = map { $_->{seq} => $_ } @{$v->{feed}};
my $e1 = $e{$s1[0]};
is_deeply([@$e1{qw(who gift qty rounds device statusText latency status)}],
    ['Alice', 'Motor', "\x{d7}1", '10 rounds', 'motor_01', 'accepted', '12 ms',
     'ok'], 'an entry: who, gift x quantity, rounds, device, status, '
    . 'latency') or diag explain $e1;
is($e{$s1[1]}{qty}, "\x{d7}5", 'quantity');
is($e{$s1[1]}{rounds}, '5 rounds (capped, 50,000 asked)',
    'a gift above the per-gift limit: rounds turned, rounds asked');
is($e{$s1[2]}{who}, $hostile, 'a name with markup is shown as text');
is($e{$s1[2]}{gift}, '<b>Lion</b>', 'a gift name with markup too');
is($v->{foreign}, 0, 'no element from the data in the feed');
is($v->{pwned}, undef, 'no script from the data ran');
is($e{$s1[3]}{who}, 'user_777', 'no userName: the userId');
is($e{$s1[3]}{status}, 'dead_letter', 'dead letter marked');
is($e{$s1[3]}{statusText}, 'dead letter: timeout', 'with its reason');
is($e{$s1[4]}{who}, "Zo\x{eb} \x{202e}lived", 'non-ASCII name intact');
is($e{$s1[5]}{rounds}, '0 rounds', 'a streak frame: 0 rounds');
is_deeply(totals($v), expected_totals(@s1),
    'device totals: rounds, gifts, failed')
    or diag explain $v->{totals};
is_deeply(totals($v), { motor_01 => [30, 3, 0], motor_02 => [5, 1, 1],
    motor_03 => [7, 1, 0] }, 'device totals, by hand');
is($v->{lastId}, "last id $s1[-1]", 'last event id shown');
cmp_ok($v->{layout}{scrollWidth}, '<=', $v->{layout}{innerWidth},
    '1920: no horizontal scrolling');
ok($v->{layout}{totalsPanel}{x} > $v->{layout}{feedPanel}{x}
    && $v->{layout}{totalsPanel}{visible},
    '1920: totals beside the feed');

# ------------------------------------------------------------ resume

# A reload ends every stream (the old workers exit); EventSource reconnects
# after the retry: hint (3 s here) with Last-Event-ID.  What is published
# meanwhile must arrive once.  The page cannot reconnect until the three
# are published: its requests to /gift/events fail until then.
$browser->cmd(block => url => '**/gift/events*');
$ngx->reload;
$v = wait_view(10, sub { $_[0]{state} eq 'reconnecting' });
is($v->{state}, 'reconnecting', 'nginx reloaded: page reconnecting');
like($v->{connText}, qr/reconnecting.*last id $s1[-1]/,
    'reconnecting, with the last id');
ok(GiftTest::wait_until(10, sub { $following->() >= 4 }),
    'new workers follow GIFT_ACKS');
my @s2 = (
    ack(userName => 'Carol', deviceId => 'motor_03', rounds => 50,
        giftName => 'Motor', diamond => 10, quantity => 5),
    ack(userName => 'Dave', deviceId => 'motor_01', rounds => 1,
        giftName => 'Rose', diamond => 1),
    ack(userName => 'Erin', deviceId => 'motor_02', rounds => 4,
        status => 'dead_letter', reason => 'device_error', attempts => 5),
);
isnt($browser->view->{state}, 'live',
    'three published while the page was disconnected');
$browser->cmd(unblock => url => '**/gift/events*');
$v = wait_view(60, sub { $_[0]{state} eq 'live' && @{$_[0]{feed}} >= 9 });
is($v->{state}, 'live', 'live again');
is_deeply(seqs($v), [reverse @s1, @s2],
    'resumed: the missed three, once each, in order');
is_deeply(totals($v), expected_totals(@s1, @s2), 'totals include them');
is($v->{lastId}, "last id $s2[-1]", 'last id advanced');
is_deeply($v->{problems}, [], 'no page errors, no CSP refusals');
$browser->cmd(screenshot => path => "$BUILD/overlay-1920.png");
ok(-s "$BUILD/overlay-1920.png", 'screenshot build/overlay-1920.png');

# ------------------------------------------------------------ gap, cap

# ?since=0 asks for everything; the server keeps 8 (gift_sse_replay_max):
# a gap event, then the newest 8, of which ?max=5 shows 5.
my @all = sort { $a <=> $b } keys %sent;
$browser->cmd(goto => url => "$base?since=0&max=5", width => 1920,
    height => 1080);
$v = wait_view(10, sub { @{$_[0]{feed}} >= 5 && $_[0]{notice}
    && $_[0]{lastId} eq "last id $all[-1]" });
my $gap_to = $all[-1] - 8;
like($v->{notice} // '', qr/Missed \Q$gap_to\E acknowledgements? \(#1(\x{2013}#$gap_to)?\)/,
    'gap notice names what the server no longer has')
    or diag explain $v->{notice};
is_deeply(seqs($v), [reverse @all[-5 .. -1]],
    'feed capped at ?max=5, newest first');
is_deeply(totals($v), expected_totals(@all[-8 .. -1]),
    'totals count all eight replayed');

# ------------------------------------------------------------ filters

$browser->cmd(goto => url => "$base?device=motor_02", width => 1920,
    height => 1080);
wait_view(10, sub { $_[0]{state} eq 'live' });
my $f1 = ack(deviceId => 'motor_01', userName => 'Frank');
my $f2 = ack(deviceId => 'motor_02', userName => 'Grace', rounds => 2);
$v = wait_view(10, sub { grep { $_->{seq} eq $f2 } @{$_[0]{feed}} });
is_deeply(seqs($v), [$f2], '?device=motor_02: only that device');
is_deeply([map { $_->{device} } @{$v->{totals}}], ['motor_02'],
    'totals of that device only');

# ------------------------------------------------------------ full chain

SKIP: {
    require GiftDispatch;
    require GiftTB;
    my $use_tb = GiftTB::available() && ($ENV{GIFT_TB} // '') ne 'tbsim';
    GiftTest::skip_unless(-x "$BUILD/gift-dispatcher"
        && ($use_tb || -x "$BUILD/tbsim"),
        'build/gift-dispatcher or build/tbsim not built', 9);

    # motor_04 is offline: its gift is dead-lettered after MaxDeliver (5)
    # attempts, kept short here
    my ($mq, $tbep, $tb, $mqtt_port, $mqtt_conf);
    if ($use_tb) {
        $tbep = GiftTB::start_tb(motors => 8, dispatchers => 1);
        $tb = GiftTB::start_motors(port => $tbep->port, motors => 8,
            args => ['--offline', 'motor_04']);
        ($mqtt_port, $mqtt_conf) = ($tbep->port, $tbep->mqtt_conf(1));
    } else {
        $mq = GiftDispatch::start_mosquitto();
        $tb = GiftDispatch::start_tbsim(mqtt_port => $mq->port,
            args => ['--offline', 'motor_04']);
        ($mqtt_port, $mqtt_conf) = ($mq->port, '');
    }
    my $disp = GiftDispatch::start_dispatcher(nats_url => $nats->url,
        mqtt_port => $mqtt_port, extra_mqtt => $mqtt_conf, rpc_timeout_ms => 300,
        extra_nats => 'retry_delays_ms = [ 100 ];');

    $browser->cmd(goto => url => $base, width => 1920, height => 1080);
    wait_view(10, sub { $_[0]{state} eq 'live' });
    my @gifts = (
        GiftTest::gift(userName => 'Chain Rose', giftName => 'Rose',
            diamond => 1, quantity => 5),
        GiftTest::gift(userName => 'Chain Motor', giftName => 'Motor',
            diamond => 10, quantity => 2),
        GiftTest::gift(userName => 'Chain Lion', giftName => 'Lion',
            diamond => 2, quantity => 1),
    );
    my @st = map { (GiftTest::post_gift($ngx->port, $_))[0] } @gifts;
    is_deeply(\@st, [202, 202, 202], 'POST /gift x3: 202');
    $v = wait_view(20, sub { @{$_[0]{feed}} >= 3 });
    my %by = map { $_->{who} => $_ } @{$v->{feed}};
    is(scalar(@{$v->{feed}}), 3, 'three acknowledgements through the chain');
    is_deeply([@{$by{'Chain Rose'}}{qw(device rounds status)}],
        ['motor_02', '5 rounds', 'ok'], 'Rose: motor_02, 1 x 5 = 5 rounds');
    is_deeply([@{$by{'Chain Motor'}}{qw(device rounds status)}],
        ['motor_03', '20 rounds', 'ok'], 'Motor: motor_03, 10 x 2 = 20');
    is_deeply([@{$by{'Chain Lion'}}{qw(device rounds status)}],
        ['motor_04', '6 rounds', 'dead_letter'],
        'Lion: motor_04 (x3 = 6), offline: dead letter');
    like($by{'Chain Lion'}{statusText} // '', qr/^dead letter: \w+/,
        'with its reason') or diag explain $by{'Chain Lion'};
    like($by{'Chain Motor'}{latency} // '', qr/^\d+(\.\d)? (ms|s)$/,
        'latency shown');
    is_deeply(totals($v), { motor_02 => [5, 1, 0], motor_03 => [20, 1, 0],
        motor_04 => [0, 0, 1] }, 'device totals through the chain');
    my $rounds = $tb->rounds;
    is_deeply([@$rounds{qw(motor_02 motor_03)}], [5, 20],
        'the motors turned what the page shows');

    $disp->stop;
    $tb->stop;
    $tbep ? $tbep->stop : $mq->stop;
}

# ------------------------------------------------------------ phone, OBS

# the newest seven of GIFT_ACKS (the chain's included), replayed
my $last = GiftTest::stream_info($nats->url)->{GIFT_ACKS}{last_seq};
my $since = $last - 7;

$browser->cmd(goto => url => "$base?since=$since", width => 390,
    height => 844);
$v = wait_view(10, sub { @{$_[0]{feed}} >= 7 });
is(scalar @{$v->{feed}}, 7, 'phone: replayed with ?since=');
cmp_ok($v->{layout}{scrollWidth}, '<=', $v->{layout}{innerWidth},
    'phone: no horizontal scrolling');
ok($v->{layout}{totalsPanel}{y} < $v->{layout}{feedPanel}{y},
    'phone: totals above the feed');
cmp_ok($v->{layout}{firstEntry}{w}, '>=', 300, 'phone: entries full width');
$browser->cmd(screenshot => path => "$BUILD/overlay-phone.png",
    fullPage => JSON::PP::true);
ok(-s "$BUILD/overlay-phone.png", 'screenshot build/overlay-phone.png');

$browser->cmd(goto => url => "$base?transparent=1&since=$since",
    width => 1920, height => 1080);
$v = wait_view(10, sub { @{$_[0]{feed}} >= 7 && $_[0]{state} eq 'live' });
my $lay = $v->{layout};
is_deeply([@$lay{qw(bodyBackground htmlBackground)}],
    ['rgba(0, 0, 0, 0)', 'rgba(0, 0, 0, 0)'],
    'transparent: no page background');
cmp_ok($lay->{whoFontPx} // 0, '>=', 28, 'transparent: large text');
isnt($lay->{whoTextShadow} // 'none', 'none', 'transparent: outlined text');
ok(!$lay->{conn}{visible}, 'transparent: connection state hidden while live');
$browser->cmd(screenshot => path => "$BUILD/overlay-transparent.png",
    transparent => JSON::PP::true);
ok(-s "$BUILD/overlay-transparent.png",
    'screenshot build/overlay-transparent.png');
is_deeply($browser->view->{problems}, [], 'no page errors, no CSP refusals');

# ------------------------------------------------------------ teardown

my $profile = $browser->{profile};
is($browser->close, 0, 'driver closed the browser and exited 0');
ok(!GiftBrowser::browser_pids($profile), 'no Chromium process left');

$nc->close;
is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
diag sprintf('overlay test: %.1f s', time - $T0);

done_testing();

