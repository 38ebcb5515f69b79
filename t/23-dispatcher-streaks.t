#!/usr/bin/perl
# TikTok streaks end to end, with real processes: frames POSTed to the
# webhook (TikTok-Live-Connector's flat form, giftType 1, repeatCount a
# running total) turn the motor by exactly the streak's total, whatever
# arrives twice, late or never (the final frame); each frame gets one
# GiftAck, with rounds 0 and no command when it adds nothing; the count
# lives in KV GIFT_STREAKS and survives a dispatcher killed with SIGKILL;
# a frame whose RPC fails is retried with its own increment, not 0.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use MIME::Base64 ();
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
# ThingsBoard: the stand-in and its motors (GIFT_TB=tbsim: tbsim on mosquitto)
my $st = GiftTB::start_stack(dir => $dir, motors => 8,
    motor_args => [ '--latency-ms', '1-3' ], tbsim_args => [ '--latency-ms', '1-3' ]);
my $tb = $st->{motors};

my $rules = <<'R';
    default_device = "motor_01";
    catalogue = ( { gift_id = "5655"; name = "Rose"; diamond = 1; } );
    rule = (
        { gift = "Rose";   device = "motor_02"; multiplier = 2; },
        { gift = "Galaxy"; device = "motor_03"; },
        { gift = "Lion";   device = "motor_04"; }
    );
R
my %dconf = (dir => $dir, nats_url => $nats->url, mqtt_port => $st->{port},
    extra_mqtt => $st->conf(1), rules => $rules, rpc_timeout_ms => 300,
    extra_nats => 'retry_delays_ms = [ 100 ]; ack_wait_ms = 4000;');
my $d = GiftDispatch::start_dispatcher(%dconf);
my $ngx = GiftTest::start_nginx(dir => "$dir/nginx", nats_url => $nats->url);
GiftTest::wait_until(10, sub {
    () = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
});

# A frame as TikTok-Live-Connector 1.x emits it.
my $msg = 7137749190944230000;
sub frame {
    my (%a) = @_;
    return {
        userId => $a{user} // '6813181309701719620',
        uniqueId => 'viewer', nickname => 'Viewer',
        giftId => $a{gift_id} // 5655, giftName => $a{name} // 'Rose',
        diamondCount => $a{diamond} // 1, giftType => 1,
        repeatCount => $a{count}, repeatEnd => $a{end} ? JSON::PP::true
                                                       : JSON::PP::false,
        groupId => $a{group}, msgId => $a{msg} // ('' . ++$msg),
        createTime => '' . int(time * 1000),
    };
}
my (%accepted, @order);      # event id -> 1, for every 202 not duplicate
sub post {
    my ($f) = @_;
    my ($st, $b) = GiftTest::post_gift($ngx->port, $f);
    is($st, 202, "frame $f->{repeatCount} of group $f->{groupId} accepted")
        or diag explain $b;
    if (ref $b && !$b->{duplicate}) {
        $accepted{$b->{id}} = 1;
        push @order, $b->{id};
    }
    return $b;
}
my $acks_for = sub {
    my %want = map { $_ => 1 } @_;
    my @a;
    GiftTest::wait_until(20, sub {
        @a = grep { $want{$_->{ack}{event_id}} }
            GiftDispatch::acks($nats->url);
        @a >= keys %want;
    }, 0.1);
    return @a;
};
my $rounds = sub { ($tb->totals->{devices}{$_[0]} // {})->{rounds} // 0 };

# --------------------------------------------------------------- one streak
# 1, 2, 3, 3 again (same msgId: the webhook deduplicates), 5, 4 (late),
# 5 again (a new msgId, nothing new), 8; the final frame never comes.
my @ids;
for my $f (frame(count => 1, group => 'g1'), frame(count => 2, group => 'g1'))
{
    push @ids, post($f)->{id};
}
my $three = frame(count => 3, group => 'g1');
push @ids, post($three)->{id};
my $dup = post($three);
ok($dup->{duplicate}, 'the same frame again is a duplicate at the webhook');
for my $c (5, 4, 5, 8) {
    push @ids, post(frame(count => $c, group => 'g1'))->{id};
}
my @a = $acks_for->(@ids);
is(scalar @a, 7, 'seven frames, seven GiftAcks');
my %by = map { $_->{ack}{event_id} => $_->{ack} } @a;
is_deeply([ map { $by{$_}{rounds} } @ids ], [ 2, 2, 2, 4, 0, 0, 6 ],
    'each frame counts what it adds (x2 multiplier): 1,1,1,2,0,0,3');
is(scalar(grep { $_->{ack}{status} ne 'ok' } @a), 0, 'all status ok');
ok(GiftTest::wait_until(10, sub { $rounds->('motor_02') >= 16 }, 0.1),
    'the motor turned');
my $t = $tb->totals->{devices}{motor_02};
is($t->{rounds}, 16, 'tbsim: exactly the streak total, 8 x 1 diamond x 2');
is($t->{events}, 5, '... from the five frames that added something: '
    . 'frames adding nothing sent no command');
is($t->{duplicates}, 0, '... nothing twice');

# The state in KV GIFT_STREAKS: the counted total under the streak's key.
my $kv_get = sub {
    my ($key) = @_;
    my $c = GiftDispatch::NatsClient->new($nats->url);
    my ($r) = $c->requests('$JS.API.STREAM.MSG.GET.KV_GIFT_STREAKS',
        qq({"last_by_subj":"\$KV.GIFT_STREAKS.$key"}));
    $c->close;
    my $m = eval { JSON::PP->new->decode($r // '') } // {};
    return $m->{message} ? MIME::Base64::decode_base64($m->{message}{data})
                         : undef;
};
my $sid = "tiktok=3A6813181309701719620=3A5655=3Ag1";
like($kv_get->("s.$sid") // '', qr/^v1 8 /,
    "KV GIFT_STREAKS s.<streak id> holds the counted total (8)");
like($kv_get->('e.' . ($ids[-1] =~ s/:/=3A/gr)) // '', qr/^3$/,
    '... and e.<event id> the claim of the last frame (3)');

# --------------------------------------------------------------- interleaved
# Two viewers' streaks at once, with their end frames, on other devices.
my @mix = (
    frame(user => '111', name => 'Galaxy', gift_id => 11046, diamond => 1000,
        count => 1, group => 'a'),
    frame(user => '222', name => 'Lion', gift_id => 6369, diamond => 29999,
        count => 2, group => 'b'),
    frame(user => '111', name => 'Galaxy', gift_id => 11046, diamond => 1000,
        count => 4, group => 'a'),
    frame(user => '222', name => 'Lion', gift_id => 6369, diamond => 29999,
        count => 1, group => 'b'),
    frame(user => '222', name => 'Lion', gift_id => 6369, diamond => 29999,
        count => 3, group => 'b', end => 1),
    frame(user => '111', name => 'Galaxy', gift_id => 11046, diamond => 1000,
        count => 6, group => 'a', end => 1),
    # a new streak of the same viewer and gift: a new group counts anew
    frame(user => '111', name => 'Galaxy', gift_id => 11046, diamond => 1000,
        count => 2, group => 'a2', end => 1),
);
my @mids = map { post($_)->{id} } @mix;
@a = $acks_for->(@mids);
is(scalar @a, 7, 'interleaved streaks: one GiftAck per frame');
ok(GiftTest::wait_until(10, sub {
    $rounds->('motor_03') >= 8000 && $rounds->('motor_04') >= 3 * 29999
}, 0.1), 'both motors turned');
is($rounds->('motor_03'), 8000, 'Galaxy: 6 + 2 frames x 1000 diamonds');
is($rounds->('motor_04'), 3 * 29999, 'Lion: 3 x 29999 (a late 1 adds '
    . 'nothing)');

# --------------------------------------------------------------- SIGKILL
# The count lives in KV, not in the dispatcher: frames 1-3, SIGKILL, a new
# dispatcher, then 5, 4 (late) and 7.
my $before = $rounds->('motor_02');
my @k = map { post(frame(count => $_, group => 'g3'))->{id} } 1 .. 3;
$acks_for->(@k);
$d->stop('KILL', 5);
$d = GiftDispatch::start_dispatcher(%dconf);
push @k, map { post(frame(count => $_, group => 'g3'))->{id} } 5, 4, 7;
@a = $acks_for->(@k);
is(scalar @a, 6, 'SIGKILL mid-streak: one GiftAck per frame');
ok(GiftTest::wait_until(10, sub { $rounds->('motor_02') >= $before + 14 },
    0.1), 'the motor turned');
is($rounds->('motor_02') - $before, 14,
    'the restarted dispatcher continued the count: 7 x 2, no more');

# --------------------------------------------------------------- retried frame
# The motor is offline when frame 3 comes: its RPC times out and is
# retried; once the motor is back, the retry turns its increment (3), not
# 0 (the count already says 3), and frames that follow add only theirs.
$st->mute('motor_02');
$before = $rounds->('motor_02');
my ($r3) = map { post(frame(count => $_, group => 'g4'))->{id} } 3;
ok(GiftTest::wait_until(10, sub {
    ($tb->totals->{devices}{motor_02}{ignored} // 0) >= 1
}, 0.05), 'the offline motor swallowed the first RPC');
$tb->control('online motor_02');
my $r5 = post(frame(count => 5, group => 'g4', end => 1))->{id};
@a = $acks_for->($r3, $r5);
%by = map { $_->{ack}{event_id} => $_->{ack} } @a;
is($by{$r3}{status}, 'ok', 'the retried frame: ok');
cmp_ok($by{$r3}{attempts}, '>=', 2, '... after a retry');
is($by{$r3}{rounds}, 6, '... with its own increment (3 x 2)');
is($by{$r5}{rounds}, 4, 'the next frame adds 2 x 2');
ok(GiftTest::wait_until(10, sub { $rounds->('motor_02') >= $before + 10 },
    0.1), 'the motor turned');
is($rounds->('motor_02') - $before, 10, 'streak total 5 x 2 exactly');

# --------------------------------------------------------------- totals
my @all = GiftDispatch::acks($nats->url);
my %n;
$n{$_->{ack}{event_id}}++ for @all;
is(scalar(keys %n), scalar(keys %accepted), 'one GiftAck per accepted frame');
is_deeply([ grep { $n{$_} > 1 } keys %n ], [], 'never two');
my $sum = 0;
$sum += $_->{ack}{rounds} for grep { $_->{ack}{status} eq 'ok' } @all;
my $tt = $tb->totals->{totals};
is($tt->{rounds}, $sum, "the motors' total equals the GiftAcks' ($sum)");
is($tt->{duplicates}, 0, 'no command was executed twice');
cmp_ok($d->metric('gift_dispatcher_streak_updates_total{outcome="new"}'),
    '>', 0, '/metrics counts streak updates');

is($d->stop('TERM', 15), 0, 'SIGTERM: exit 0');
$st->stop;
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
is_deeply([ $ngx->bad_log_lines ], [], 'no alert or emerg in nginx');
$ngx->stop;
done_testing();
