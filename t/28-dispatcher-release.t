#!/usr/bin/perl
# Issue 14, point 1: a release on stop adds no back-off.  A gift waiting
# in a paused device's queue when the dispatcher stops (SIGTERM) is naked
# without delay: it can be delivered again at once, not after the ack
# wait (60 s here) nor after a retry back-off (60 s here), and the
# release spent no attempt.  The test itself pulls from the consumer just
# after the stop to see it, then gives it back.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
my $st = GiftTB::start_stack(dir => $dir, motors => 'motor_01,motor_03');
my $tb = $st->{motors};
my $rules = <<'R';
    default_device = "motor_01";
    rule = ( { gift = "Motor"; device = "motor_03"; } );
R
my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $st->{port}, extra_mqtt => $st->conf(1), rules => $rules,
    shutdown_timeout_ms => 5000,
    extra_nats => 'ack_wait_ms = 60000; retry_delays_ms = [ 60000 ]; '
        . 'max_attempts = 3;');

my ($out, $rc);
$d->pause_ok('motor_03');
is(GiftDispatch::js_publish_gifts($nats->url,
    GiftDispatch::gift(giftName => 'Motor', diamond => 2, quantity => 3,
        eventId => 'held-1')), 1, 'a gift for the paused motor');
ok(GiftTest::wait_until(20, sub {
    ($d->metric('gift_dispatcher_device_queued{device="motor_03"}') // 0) == 1
}, 0.1), '... held in its queue');

is($d->stop('TERM', 20), 0, 'SIGTERM: exit 0');
like($d->log_text, qr/stopping: released 1 queued gifts/,
    '... it released the queued gift');

# One pull, as a dispatcher would, waiting up to 5 s: the gift is there at
# once if the release added no delay (the ack wait and the back-off are
# 60 s).  Returns (the consumer's delivery sequence, reply subject,
# seconds) or ().
sub pull_one {
    my $c = GiftDispatch::NatsClient->new($nats->url);
    my $s = $c->{s};
    my $inbox = "$c->{inbox}.pull";
    my $t0 = time;
    my $req = '{"batch":1,"expires":5000000000}';
    print $s "PUB \$JS.API.CONSUMER.MSG.NEXT.GIFTS.dispatcher $inbox "
        . length($req) . "\r\n$req\r\nPING\r\n";
    while (defined(my $line = <$s>)) {
        if ($line =~ /^PING/) {
            print $s "PONG\r\n";
        } elsif ($line =~ /^(H?)MSG\s+\S+\s+\d+\s+(?:(\S+)\s+)?(?:\d+\s+)?(\d+)\r\n$/) {
            my ($hdr, $reply, $len) = ($1, $2, $3);
            my $buf;
            read($s, $buf, $len + 2);
            # a status (408 at the expiry) has headers and no reply subject
            next if $hdr && (!defined $reply || $reply !~ /^\$JS\.ACK\./);
            my @t = split /\./, $reply;
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
            my $dt = time - $t0;
            print $s "PUB $reply 4\r\n-NAK\r\nPING\r\n";
            <$s> for 1 .. 2;           # PONG(s): the nak has been read
            close $s;
            return ($t[6], $reply, $dt);
        }
        last if time - $t0 > 6;
    }
    close $s;
    return ();
}
my ($dseq, $reply, $dt) = pull_one();
ok(defined $dseq, 'the released gift can be delivered again at once')
    or diag 'nothing within 5 s';
# (the consumer's second delivery; its delivery count says 1 on
# nats-server 2.9: t/27-dispatcher-redelivered-as-new.t says why)
is($dseq, 2, "... the consumer's second delivery") or diag "reply subject: $reply";
cmp_ok($dt // 99, '<', 5,
    sprintf('... within the pull (%.2f s; the ack wait and the back-off '
        . 'are 60 s)', $dt // 99));

$d->start;
($out, $rc) = $d->ctl('resume', 'motor_03');
is($rc, 0, 'ctl resume motor_03') or diag $out;
my @a;
ok(GiftTest::wait_until(30, sub {
    @a = grep { $_->{ack}{event_id} eq 'held-1' } GiftDispatch::acks($nats->url);
    @a;
}, 0.1), 'the gift is acknowledged') or diag $d->log_text;
is($a[0]{ack}{status}, 'ok', '... ok');
is($a[0]{ack}{attempts}, 1, '... attempt 1: the release spent none');
is($tb->totals->{devices}{motor_03}{rounds}, 6, 'motor_03 turned 2 x 3, once');

is($d->stop('TERM'), 0, 'the dispatcher exits 0 on SIGTERM');
$st->stop;
is(scalar(GiftDispatch::sanitizer_reports($d->log_text)), 0,
    'no sanitizer reports');
done_testing();
