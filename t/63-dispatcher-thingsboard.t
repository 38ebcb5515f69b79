#!/usr/bin/perl
# gift-dispatcher against what ThingsBoard does (the stand-in of
# tools/tbstandin and its motors, real processes): a gift turns its motor
# once; a silent motor ends in the chain's TIMEOUT reply and an unconnected
# one in NO_ACTIVE_CONNECTION, named in the acknowledgement (device_timeout,
# device_offline); coalesced commands that would pass ThingsBoard's 64 KiB
# are split before sending (nothing closes the connection); a dispatcher
# disconnected for its rate limit with replies in flight (dropped by
# ThingsBoard: they belonged to the old session) loses and doubles no turn;
# two dispatchers with one access token push each other out, and a pool of
# tokens in the configuration gives each running dispatcher its own.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

GiftTest::skip_all_unless(GiftTB::available(),
                          'node or tools/tbstandin/node_modules missing');

my $dir = GiftTest::tempdir();

# ------------------------------------------------------------ configuration
{
    my $bin = GiftDispatch::bin('gift-dispatcher');
    GiftTest::spurt("$dir/bad.conf", <<'EOF');
nats = { url = "nats://127.0.0.1:4222"; };
mqtt = {
    max_payload = 600;
    access_token = "a";
    access_tokens = [ "b", "c" ];
};
rules = { default_device = "motor_01"; };
EOF
    my $out = `'$bin' -t -c '$dir/bad.conf' 2>&1`;
    isnt($? >> 8, 0, '-t refuses');
    like($out, qr/mqtt\.max_payload: 600 cannot hold one command \(at least \d+ bytes\)/,
        '... a max_payload that cannot hold one command') or diag $out;
    like($out, qr/access_token or access_tokens, not both/, '... a token and a pool');
}

my $nats = GiftTest::start_nats(dir => $dir);
GiftTest::spurt("$dir/devices.json", $GiftTest::JSON->encode({ devices => [
    (map { { name => sprintf('motor_%02d', $_), token => sprintf('motor_%02d', $_) } } 1 .. 6),
    { name => 'gift-dispatcher-1', token => 'gift-dispatcher-1', profile => 'gift-dispatcher' },
    { name => 'gift-dispatcher-2', token => 'gift-dispatcher-2', profile => 'gift-dispatcher',
      rateLimit => '25:1' },
    (map { { name => "gift-dispatcher-$_", token => "tok-$_", profile => 'gift-dispatcher' } } 3 .. 5),
] }));
# the rule chain's RPC timeout 2 s; the dispatcher's 3.5 s
my $tb = GiftTB::start_tb(dir => $dir, port => GiftTest::free_port(),
    motors => 0, dispatchers => 0,
    args => [ '--devices', "$dir/devices.json", '--rpc-timeout-ms', 2000 ]);
my $m = GiftTB::start_motors(dir => $dir, port => $tb->port,
    motors => join(',', map { sprintf 'motor_%02d', $_ } 1 .. 6),
    args => [ '--silent', 'motor_05', '--offline', 'motor_06' ]);

my $rules = <<'EOF';
    default_device = "motor_01";
    rule = (
        { gift = "Rose";   device = "motor_02"; },
        { gift = "Motor";  device = "motor_03"; },
        { gift = "Bulk";   device = "motor_04"; },
        { gift = "Silent"; device = "motor_05"; },
        { gift = "Gone";   device = "motor_06"; }
    );
EOF
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $tb->port,
    rpc_timeout_ms => 3500, extra_nats => 'retry_delays_ms = [ 100 ];',
    extra_mqtt => 'access_token = "gift-dispatcher-1";',
    extra_devices => 'coalesce_max_events = 1024;', rules => $rules);
my $d = GiftDispatch::start_dispatcher(%dconf);

my %want;    # event id -> rounds
sub send_gifts {
    my @g = @_;
    $want{$_->{eventId}} = $_->{diamond} * $_->{quantity} for @g;
    is(GiftDispatch::js_publish_gifts($nats->url, @g), scalar @g,
        scalar(@g) . ' gift(s) stored');
}
sub acks_of {
    my %ids = map { $_ => 1 } @_;
    return grep { $ids{$_->{ack}{event_id}} } GiftDispatch::acks($nats->url);
}
sub wait_acks {
    my ($n, $secs, @ids) = @_;
    my @a;
    GiftTest::wait_until($secs, sub { (@a = acks_of(@ids)) >= $n }, 0.2);
    return @a;
}

# ------------------------------------------------------------ a gift
my $g = GiftDispatch::gift(giftName => 'Motor', diamond => 7, eventId => 'tb-one');
send_gifts($g);
my ($a) = wait_acks(1, 20, 'tb-one');
is($a && $a->{ack}{status}, 'ok', 'one gift: status ok') or diag explain $a;
is($m->totals->{devices}{motor_03}{rounds}, 7, 'motor_03 turned 7 rounds');

# ------------------------------------------------------------ TIMEOUT, NO_ACTIVE_CONNECTION
send_gifts(GiftDispatch::gift(giftName => 'Silent', eventId => 'tb-silent'),
           GiftDispatch::gift(giftName => 'Gone', eventId => 'tb-gone'));
my @e = wait_acks(2, 60, 'tb-silent', 'tb-gone');
my %by = map { $_->{ack}{event_id} => $_->{ack} } @e;
is($by{'tb-silent'}{status}, 'dead_letter', 'a silent motor: dead letter');
is($by{'tb-silent'}{reason}, 'device_timeout', '... reason device_timeout (TIMEOUT)');
is($by{'tb-silent'}{attempts}, 5, '... after 5 attempts');
is($by{'tb-gone'}{reason}, 'device_offline', 'an unconnected motor: device_offline (NO_ACTIVE_CONNECTION)');
my $t = $tb->totals;
is($t->{devices}{motor_05}{errors}{TIMEOUT}, 5, 'the chain answered TIMEOUT 5 times');
is($t->{devices}{motor_06}{errors}{NO_ACTIVE_CONNECTION}, 5, '... and NO_ACTIVE_CONNECTION 5 times');
is($m->totals->{devices}{motor_05}{rpcs}, 5, 'the silent motor received the 5 RPCs');

# ------------------------------------------------------------ 64 KiB
# motor_04 answers slowly; while its first command is out, 600 gifts with
# 120-character ids queue up: one command would be ~100 KB
$m->control('latency 800');
send_gifts(GiftDispatch::gift(giftName => 'Bulk', eventId => 'bulk-first'));
GiftTest::wait_until(20, sub { $m->totals->{devices}{motor_04}{rpcs} >= 1 }, 0.1)
    or diag 'motor_04 got no RPC';
my @bulk = map { GiftDispatch::gift(giftName => 'Bulk', diamond => 1,
    eventId => sprintf('bulk-%03d-', $_) . ('x' x 111)) } 1 .. 600;
send_gifts(@bulk);
$m->control('latency 0');
my @b = wait_acks(601, 60, 'bulk-first', map { $_->{eventId} } @bulk);
is(scalar(grep { $_->{ack}{status} eq 'ok' } @b), 601, '601 gifts acknowledged ok');
$t = $tb->totals;
is($t->{totals}{tooLarge}, 0, 'no PUBLISH over 64 KiB');
is($t->{devices}{'gift-dispatcher-1'}{connects}, 1, 'the dispatcher never lost its connection');
cmp_ok($t->{devices}{motor_04}{rpcsToDevice}, '>=', 3, 'the 600 went in 2 or more commands')
    or diag explain $t->{devices}{motor_04};
my $mt = $m->totals->{devices}{motor_04};
is($mt->{events}, 601, 'motor_04 executed each of the 601 events');
is($mt->{duplicates}, 0, '... none twice');
$d->stop('TERM', 20);

# ------------------------------------------------------------ one token, two dispatchers
my $d1 = GiftDispatch::start_dispatcher(%dconf);
my $d1b = GiftDispatch::start_dispatcher(%dconf);
ok(GiftTest::wait_until(20, sub { $tb->totals->{devices}{'gift-dispatcher-1'}{kicked} >= 3 }, 0.2),
    'two dispatchers with one access token keep pushing each other out');
$d1b->stop('TERM', 20);
$d1->stop('TERM', 20);

# ------------------------------------------------------------ a pool of tokens
# dispatchers from one configuration lease distinct tokens in KV
my $pool = 'access_tokens = [ "tok-3", "tok-4", "tok-5" ];';
my @pd = map { GiftDispatch::start_dispatcher(%dconf, extra_mqtt => $pool) } 1 .. 3;
ok(GiftTest::wait_until(20, sub {
    my $t = $tb->totals->{devices};
    3 == grep { $t->{"gift-dispatcher-$_"}{connected} } 3 .. 5;
}, 0.2), 'three dispatchers, one configuration: three ThingsBoard devices');
my $t5 = $tb->totals->{devices};
is((join ',', map { $t5->{"gift-dispatcher-$_"}{kicked} } 3 .. 5), '0,0,0',
    '... and no session pushed out another');
like($pd[0]->log_text, qr/MQTT: access token \d of 3 \(leased in KV/, '... each says which it leased');
my $fourth = eval { GiftDispatch::start_dispatcher(%dconf, extra_mqtt => $pool) };
ok(!$fourth, 'a fourth finds no free token and does not start');
like($@, qr/all 3 are leased by running dispatchers/, '... and says why') or diag $@;
is($pd[1]->stop('TERM', 20), 0, 'one stops');
my $again = eval { GiftDispatch::start_dispatcher(%dconf, extra_mqtt => $pool) };
ok($again, '... and its token is free for the next') or diag $@;
$_->stop('TERM', 20) for grep { $_ && $_->pid } @pd, $again;

# ------------------------------------------------------------ rate limit
# gift-dispatcher-2 may send 25 messages a second; motors answer after
# 200 ms, so a burst gets it disconnected with replies in flight
$m->control('latency 200');
my $d2 = GiftDispatch::start_dispatcher(%dconf,
    extra_mqtt => 'access_token = "gift-dispatcher-2";',
    extra_devices => 'max_inflight = 4; coalesce_max_events = 1;');
my $before = $m->totals->{devices};
my @burst = map { GiftDispatch::gift(giftName => (qw(Rose Motor Bulk))[$_ % 3],
    diamond => 1 + $_ % 4, eventId => "rl-$_") } 1 .. 60;
send_gifts(@burst);
my @r = wait_acks(60, 120, map { $_->{eventId} } @burst);
my %n;
$n{$_->{ack}{event_id}}++ for @r;
is(scalar(keys %n), 60, 'every gift of the burst acknowledged');
is(scalar(grep { $n{$_} > 1 } keys %n), 0, '... once');
is(scalar(grep { $_->{ack}{status} ne 'ok' } @r), 0, '... ok');
$t = $tb->totals->{devices}{'gift-dispatcher-2'};
cmp_ok($t->{rateLimited}, '>=', 1, 'the dispatcher was disconnected for its rate limit')
    or diag explain $t;
cmp_ok($t->{repliesDropped}, '>=', 1, '... with replies in flight, which were dropped');
my $after = $m->totals->{devices};
my ($ev, $rounds, $want) = (0, 0, 0);
for my $dev (qw(motor_02 motor_03 motor_04)) {
    $ev += $after->{$dev}{events} - $before->{$dev}{events};
    $rounds += $after->{$dev}{rounds} - $before->{$dev}{rounds};
}
$want += $want{$_->{eventId}} for @burst;
is($ev, 60, 'the motors executed the 60 events once each');
is($rounds, $want, "... $want rounds: no turn lost or doubled");
$d2->stop('TERM', 20);
like($d2->log_text, qr/MQTT: connection lost/, 'the dispatcher saw the disconnect');

$m->stop;
$tb->stop;
is_deeply([ GiftDispatch::sanitizer_reports($d->log_text . $d2->log_text) ], [],
    'no sanitizer report');
done_testing();
