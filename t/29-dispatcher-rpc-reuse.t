#!/usr/bin/perl
# Issue 14, point 6: a reply only completes its own command.  RPC ids wrap
# (here after 8 ids, with the test failpoint rpc_counter_bits=3).  Three
# slow motors (a1..a3) answer 2500 ms late, past the 1000 ms RPC timeout;
# ten silent motors (s01..s10, offline: they never answer) with a backlog
# keep every free id in flight.  When an a-motor's command times out, its
# id is free; without the quarantine a silent motor's next command takes
# it, and the late reply then completes THAT command: a gift for a motor
# that never answered is acknowledged ok.
#
# The file runs the scenario twice: first the control, mqtt.late_reply_ms
# = 0 (no quarantine), which must produce such a wrong completion (else the
# scenario proves nothing); then with the default late_reply_ms, where the
# late replies are ignored as not ours and no gift is acknowledged ok.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;

my @slow = map { "a$_" } 1 .. 3;
my @silent = map { sprintf 's%02d', $_ } 1 .. 10;
my $PER = 10;                                  # gifts per silent motor

sub scenario {
    my ($label, $extra_mqtt) = @_;
    my $dir = GiftTest::tempdir();
    my $nats = GiftTest::start_nats(dir => $dir);
    my $mq = GiftDispatch::start_mosquitto(dir => $dir);
    my $tb = GiftDispatch::start_tbsim(dir => $dir, mqtt_port => $mq->port,
        args => [ '--latency-ms', '1', '--offline',
            join(',', map { "motor_$_" } @silent) ]);
    $tb->control('slow ' . join(',', map { "motor_$_" } @slow) . '=2500');
    my $rules = "    rule = (\n" . join(",\n", map {
        "        { gift = \"G$_\"; device = \"motor_$_\"; }" } @slow, @silent)
        . "\n    );\n";
    my $d;
    {
        local $ENV{GIFT_DISPATCHER_FAILPOINT} = 'rpc_counter_bits=3';
        $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
            mqtt_port => $mq->port, rules => $rules, rpc_timeout_ms => 1000,
            log_level => 'debug',
            extra_nats => 'retry_delays_ms = [ 20 ]; max_attempts = 1;',
            extra_mqtt => $extra_mqtt,
            extra_devices => 'coalesce_max_events = 1; offline_retry_ms = 10;');
    }
    # the slow motors' gifts first: they take the first ids
    is(GiftDispatch::js_publish_gifts($nats->url,
        (map { GiftDispatch::gift(giftName => "G$_", eventId => "$label-$_") }
            @slow),
        (map { my $s = $_; map { GiftDispatch::gift(giftName => "G$s",
            eventId => "$label-$s-$_") } 1 .. $PER } @silent)),
        @slow + @silent * $PER, "$label: a gift for each slow motor, $PER for "
        . 'each silent one');
    ok(GiftTest::wait_until(20, sub {
        $d->log_text =~ /failpoint: RPC ids wrap after 3 bits/ }, 0.1),
        "$label: RPC ids wrap after 8 (failpoint)");
    my %h = (d => $d, tb => $tb, nats => $nats, mq => $mq);
    # every slow motor's gift is dead-lettered timeout (max_attempts 1)
    ok(GiftTest::wait_until(60, sub {
        my %a = map { $_->{ack}{event_id} => $_->{ack} }
            GiftDispatch::acks($nats->url);
        !grep { !$a{"$label-$_"} } @slow;
    }, 0.1), "$label: the slow motors' gifts got their GiftAcks");
    my %a = map { $_->{ack}{event_id} => $_->{ack} }
        GiftDispatch::acks($nats->url);
    is(scalar(grep { $a{"$label-$_"}{status} eq 'dead_letter'
        && $a{"$label-$_"}{reason} eq 'timeout' } @slow), scalar @slow,
        "$label: ... all dead-lettered timeout");
    return \%h;
}

# the ok GiftAcks of gifts for motors that never answered in time
sub wrong_oks {
    my ($h) = @_;
    return grep { $_->{ack}{status} eq 'ok' }
        GiftDispatch::acks($h->{nats}->url);
}

sub finish {
    my ($h, $label) = @_;
    my $t = $h->{tb}->totals;
    is(scalar(grep { ($t->{devices}{"motor_$_"}{rounds} // 0) > 0 } @silent),
        0, "$label: no silent motor turned anything");
    is($h->{d}->stop('TERM'), 0, "$label: the dispatcher exits 0");
    is(scalar(GiftDispatch::sanitizer_reports($h->{d}->log_text)), 0,
        "$label: no sanitizer reports");
    $h->{tb}->stop;
    $h->{mq}->stop;
}

# ------------------------------------------------------------ control run
{
    my $h = scenario('ctl', 'late_reply_ms = 0;');
    my @wrong;
    ok(GiftTest::wait_until(60, sub { @wrong = wrong_oks($h) }, 0.2),
        'control (late_reply_ms = 0): a late reply completes another '
        . 'command') or diag(($h->{d}->log_text =~ /(.*RPC.*)/g)[0 .. 20]);
    like($_->{ack}{device_id}, qr/^motor_s\d\d$/,
        "control: ... $_->{ack}{event_id} acknowledged ok for "
        . "$_->{ack}{device_id}, which never answered") for @wrong;
    diag(scalar(@wrong) . ' wrong completion(s) in the control run');
    finish($h, 'control');
}

# ------------------------------------------------------------ the default
{
    my $h = scenario('def', '');
    ok(GiftTest::wait_until(60, sub {
        ($h->{d}->metric('gift_dispatcher_replies_unknown_total') // 0)
            >= @slow }, 0.2),
        'default late_reply_ms: the slow motors\' late replies came and '
        . 'were ignored as not ours');
    my @wrong = wrong_oks($h);
    is(scalar @wrong, 0, '... and completed no command: no gift '
        . 'acknowledged ok') or diag explain [ map { $_->{ack} } @wrong ];
    finish($h, 'default');
}
done_testing();
