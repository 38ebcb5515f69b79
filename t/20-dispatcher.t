#!/usr/bin/perl
# gift-dispatcher end to end, with real processes: a gift POSTed to nginx
# turns the right motor (the ThingsBoard stand-in's motors) by the right rounds, and exactly one GiftAck
# with status ok lands in GIFT_ACKS; rules (catalogue, default device,
# multiplier, zero rounds, overflow), retries and the dead-letter queue,
# SIGHUP reloads, `gift-dispatcher -t`, and SIGTERM.

use strict;
use warnings;
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $BIN = GiftDispatch::bin('gift-dispatcher');
my $dir = GiftTest::tempdir();

# --------------------------------------------------------------- -t
{
    my $bad = "$dir/bad.conf";
    # its NATS URL is a port of ours, to see whether it tries to connect
    my $lport = GiftTest::free_port();
    my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
        LocalPort => $lport, Proto => 'tcp', Listen => 5, ReuseAddr => 1)
        or die "listen: $!";
    GiftTest::spurt($bad, <<"EOF");
# a broken configuration
nats = { url = "nats://127.0.0.1:$lport"; };
mqtt = {
    port = 70000;
};
rules = { rule = ( { gift = "Rose"; device = "motor 2"; } ); };
EOF
    my $out = `'$BIN' -t -c '$bad' 2>&1`;
    my $rc = $? >> 8;
    isnt($rc, 0, '-t on a broken configuration exits non-zero');
    like($out, qr/^\Q$bad\E:4: mqtt\.port: 70000 is out of range/m,
        '... naming file, line and key') or diag $out;
    like($out, qr/^\Q$bad\E:6: rules\.rule\[0\]\.device: "motor 2" is not a device id/m,
        '... and every other bad value');

    GiftTest::spurt("$dir/syntax.conf", "nats = {\n  url = \"x\";\n  fetch_batch = ;\n};\n");
    $out = `'$BIN' -t -c '$dir/syntax.conf' 2>&1`;
    isnt($? >> 8, 0, '-t on a syntax error exits non-zero');
    like($out, qr/syntax\.conf:3: syntax error/, '... naming the line');

    # without -t it refuses to start, before any connection
    $out = `'$BIN' -c '$bad' 2>&1`;
    isnt($? >> 8, 0, 'the daemon refuses a broken configuration');
    like($out, qr/not starting/, '... and says so');
    ok(!IO::Select->new($listen)->can_read(0),
        '... without trying to connect to NATS');
    close $listen;

    $out = `'$BIN' -t -c dispatcher/gift-dispatcher.conf.example 2>&1`;
    is($? >> 8, 0, '-t accepts the example configuration') or diag $out;
    like(`'$BIN' --version`, qr/^gift-dispatcher \S+ \(cnats/, '--version');
}

# --------------------------------------------------------------- the stack
my $nats = GiftTest::start_nats(dir => $dir);
# ThingsBoard: the stand-in (tools/tbstandin) and its motors; with
# GIFT_TB=tbsim (or without node), tbsim on mosquitto as before.
my ($mq, $tbep, $tb, $mqtt_port, $mqtt_conf);
if (GiftTB::available() && ($ENV{GIFT_TB} // '') ne 'tbsim') {
    my $motors = join ',', (map { sprintf 'motor_%02d', $_ } 1 .. 7), 'motor_dead';
    $tbep = GiftTB::start_tb(dir => $dir, motors => $motors, dispatchers => 1);
    $tb = GiftTB::start_motors(dir => $dir, port => $tbep->port,
        motors => $motors, args => [ '--silent', 'motor_dead' ]);
    ($mqtt_port, $mqtt_conf) = ($tbep->port, $tbep->mqtt_conf(1));
} else {
    $mq = GiftDispatch::start_mosquitto(dir => $dir);
    $tb = GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port,
        args => [ '--offline', 'motor_dead' ]);
    ($mqtt_port, $mqtt_conf) = ($mq->port, '');
}

my $rules = <<'EOF';
    default_device = "motor_01";
    catalogue = ( { gift_id = "5655"; name = "Rose"; diamond = 1; } );
    rule = (
        { gift = "Rose";     device = "motor_02"; },
        { gift = "Motor";    device = "motor_03"; },
        { gift = "Lion";     device = "motor_04"; multiplier = 3; },
        { gift = "Heart";    device = "motor_05"; multiplier = 0; },
        { gift = "Universe"; device = "motor_06"; multiplier = 1000000; },
        { gift = "Ghost";    device = "motor_dead"; }
    );
EOF
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $mqtt_port,
    extra_mqtt => $mqtt_conf, rpc_timeout_ms => 300, extra_nats => 'retry_delays_ms = [ 100 ];',
    rules => $rules);
# the dispatcher provisions the streams nginx needs
my $d = GiftDispatch::start_dispatcher(%dconf);
like($d->log_text, qr/created stream GIFTS/, 'the dispatcher provisioned');

my $ngx = GiftTest::start_nginx(dir => "$dir/nginx", nats_url => $nats->url);
GiftTest::wait_until(10, sub {
    () = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
}) or diag 'nginx workers did not report NATS';

my $ack_of = sub {
    my ($id) = @_;
    my @a = grep { $_->{ack}{event_id} eq $id }
        GiftDispatch::acks($nats->url);
    return @a;
};
my $wait_acks = sub {
    my ($n) = @_;
    GiftTest::wait_until(20, sub {
        scalar(() = GiftDispatch::acks($nats->url)) >= $n
    }, 0.1);
};

# --------------------------------------------------------------- one gift
my $g = GiftTest::gift(giftName => 'Lion', diamond => 5, quantity => 2,
    roomId => 'room_1', eventId => 'lion-1');
my ($st, $body) = GiftTest::post_gift($ngx->port, $g);
is($st, 202, 'webhook accepted the gift') or diag explain $body;

my $r;
ok(GiftTest::wait_until(15, sub {
    $r = $tb->totals->{devices}{motor_04};
    $r && $r->{rounds} == 30;
}, 0.1), 'tbsim: motor_04 turned 5 x 2 x 3 = 30 rounds') or diag explain $r;
is($r->{rpcs}, 1, '... in one RPC');

ok($wait_acks->(1), 'a GiftAck was stored');
my @a = $ack_of->('lion-1');
is(scalar @a, 1, 'exactly one GiftAck for the gift');
my $a = $a[0]{ack};
is($a->{status}, 'ok', 'status ok');
is($a->{device_id}, 'motor_04', 'device');
is($a->{rounds}, 30, 'rounds');
is($a->{attempts}, 1, 'attempts');
is($a->{gift_name}, 'Lion', 'gift name');
is($a->{room_id}, 'room_1', 'room');
is($a->{diamond}, 5, 'diamond');
is($a->{quantity}, 2, 'quantity');
cmp_ok($a->{rpc_latency_us}, '>', 0, 'RPC latency recorded');
cmp_ok($a->{completed_at_ms}, '>=', $a->{received_at_ms}, 'completion time');
is($a[0]{subject}, 'gift.acks.motor_04', 'subject gift.acks.<device>');
is($a[0]{msg_id}, 'lion-1:ack', 'Nats-Msg-Id <event id>:ack');

my $json = GiftTest::stored($nats->url, 'GIFT_ACKS', $a[0]{seq});
is($json->{ack}{status}, 'ok', 'giftctl get GIFT_ACKS shows status ok');
is($json->{ack}{eventId}, 'lion-1', '... for the event');

ok(GiftTest::wait_until(10, sub {
    GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 0
}), 'the gift was acked on NATS');

# --------------------------------------------------------------- rules
my @more = (
    # catalogue overrides the sender's 50 diamonds: 1 x 3
    GiftTest::gift(giftName => 'Rose', giftId => '5655', diamond => 50,
        quantity => 3, eventId => 'rose-1'),
    # no rule: the default device
    GiftTest::gift(giftName => 'Galaxy', diamond => 2, quantity => 1,
        eventId => 'galaxy-1'),
    # multiplier 0: acknowledged, no command
    GiftTest::gift(giftName => 'Heart', diamond => 9, quantity => 9,
        eventId => 'heart-1'),
    # 1e6 x 1e5 x 1e6: beyond 2^53, dead-lettered
    GiftTest::gift(giftName => 'Universe', diamond => 1000000,
        quantity => 100000, eventId => 'universe-1'),
);
for (@more) {
    ($st) = GiftTest::post_gift($ngx->port, $_);
    is($st, 202, "accepted $_->{eventId}");
}
ok($wait_acks->(5), 'every gift got its GiftAck');
my %by = map { $_->{ack}{event_id} => $_ } GiftDispatch::acks($nats->url);
is($by{'rose-1'}{ack}{device_id}, 'motor_02', 'Rose by name');
is($by{'rose-1'}{ack}{rounds}, 3, '... catalogue diamond x quantity');
is($by{'rose-1'}{ack}{diamond}, 1, '... the catalogue value is reported');
is($by{'galaxy-1'}{ack}{device_id}, 'motor_01', 'unmatched: default device');
is($by{'galaxy-1'}{ack}{rounds}, 2, '... 2 rounds');
is($by{'heart-1'}{ack}{status}, 'ok', 'zero rounds: status ok');
is($by{'heart-1'}{ack}{rounds}, 0, '... with 0 rounds');
is($by{'universe-1'}{ack}{status}, 'dead_letter', 'overflow: dead letter');
is($by{'universe-1'}{ack}{reason}, 'overflow', '... reason overflow');

my $t = $tb->totals->{devices};
is($t->{motor_02}{rounds}, 3, 'tbsim: motor_02 3 rounds');
is($t->{motor_01}{rounds}, 2, 'tbsim: motor_01 2 rounds');
ok(!($t->{motor_05} && $t->{motor_05}{rpcs}), 'motors: no command for zero rounds');
ok(!($t->{motor_06} && $t->{motor_06}{rpcs}), 'motors: no command for an overflow');

my @dlq = GiftDispatch::dead_letters($nats->url);
is(scalar @dlq, 1, 'one dead letter');
is($dlq[0]{reason}, 'overflow', 'Gift-Dlq-Reason overflow');
is($dlq[0]{subject}, 'gift.dlq.tiktok', 'gift.dlq.<platform>');
is($dlq[0]{event}{event_id}, 'universe-1', 'the original event');

# --------------------------------------------------------------- retries
# motor_dead never answers: 5 deliveries time out, then the DLQ
($st) = GiftTest::post_gift($ngx->port, GiftTest::gift(giftName => 'Ghost',
    diamond => 1, quantity => 1, eventId => 'ghost-1'));
is($st, 202, 'gift for an offline device accepted');
my $ghost;
ok(GiftTest::wait_until(20, sub {
    ($ghost) = $ack_of->('ghost-1');
}, 0.2), 'offline device: a GiftAck after the retries');
is($ghost->{ack}{status}, 'dead_letter', '... dead_letter');
is($ghost->{ack}{reason}, 'timeout', '... reason timeout');
is($ghost->{ack}{attempts}, 5, '... after MaxDeliver (5) attempts');
is($tb->totals->{devices}{motor_dead}{rpcs}, 5, 'tbsim saw 5 RPCs');
@dlq = grep { $_->{event}{event_id} eq 'ghost-1' }
    GiftDispatch::dead_letters($nats->url);
is($dlq[0]{reason}, 'timeout', 'DLQ reason timeout');
is($dlq[0]{deliveries}, 5, 'Gift-Deliveries 5');

# something that is not a GiftEvent
GiftDispatch::js_publish_gifts($nats->url, { raw => "\xff\xff\xff garbage" });
ok(GiftTest::wait_until(10, sub {
    grep { $_->{reason} eq 'undecodable' }
        GiftDispatch::dead_letters($nats->url);
}, 0.1), 'undecodable message dead-lettered');

# --------------------------------------------------------------- SIGHUP
my $conf = GiftTest::slurp($d->conf);
(my $conf2 = $conf) =~ s/gift = "Motor";    device = "motor_03";/gift = "Motor";    device = "motor_07";/
    or die 'rule not found';
GiftTest::spurt($d->conf, $conf2);
$d->signal('HUP');
ok(GiftTest::wait_until(5, sub { $d->log_text =~ /reloaded/ }),
    'SIGHUP: rules reloaded');
GiftTest::post_gift($ngx->port, GiftTest::gift(giftName => 'Motor',
    diamond => 4, quantity => 1, eventId => 'motor-after-hup'));
ok(GiftTest::wait_until(10, sub {
    ($tb->totals->{devices}{motor_07}{rounds} // 0) == 4
}, 0.1), '... and the next gift follows the new rule');

GiftTest::spurt($d->conf, $conf2 . "\nrules = { broken\n");
$d->signal('HUP');
ok(GiftTest::wait_until(5, sub {
    $d->log_text =~ /reload failed, keeping the old rules: \S+:\d+/
}), 'a bad reload keeps the old rules and says where');
GiftTest::post_gift($ngx->port, GiftTest::gift(giftName => 'Motor',
    diamond => 6, quantity => 1, eventId => 'motor-after-bad-hup'));
ok(GiftTest::wait_until(10, sub {
    ($tb->totals->{devices}{motor_07}{rounds} // 0) == 10
}, 0.1), '... and gifts still follow them');
ok(GiftTest::alive($d->pid), 'the dispatcher is still running');

# --------------------------------------------------------------- totals
my @all = GiftDispatch::acks($nats->url);
my %n;
$n{$_->{ack}{event_id}}++ for @all;
is_deeply([ grep { $n{$_} > 1 } keys %n ], [], 'no event has two GiftAcks');
is($tb->totals->{totals}{duplicates}, 0, 'no command was repeated');

# --------------------------------------------------------------- SIGTERM
my $status = $d->stop('TERM', 15);
is($status, 0, 'SIGTERM: exit status 0');
like($d->log_text, qr/exiting \(0\)/, '... after an orderly stop');
is_deeply([ grep { / error gift-dispatcher: / && !/reload failed/ }
    split /\n/, $d->log_text ], [], 'no other error logged');
$tb->stop;
$tbep->stop if $tbep;
is_deeply([ GiftDispatch::sanitizer_reports($d->log_text . $tb->log_text) ],
    [], 'no sanitizer report');
is_deeply([ $ngx->bad_log_lines ], [], 'no alert or emerg in nginx');

$ngx->stop;
done_testing();
