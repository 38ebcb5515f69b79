#!/usr/bin/perl
# A completion marker lost with a failing publish.  The marker (KV
# GIFT_DONE, key <event id>) is a core publish sent just before the
# gift's GiftAck: nothing says whether it was stored.  When the server
# refuses writes (here: GIFT_ACKS and KV_GIFT_DONE full, discard new; in
# t/22 a NATS server stopping under load), both fail; the GiftAck is
# retried until it is stored, and each retry sends the marker again first.
# Without that, the gift is acked with no marker: a later redelivery (an
# ack lost with a restarting server, or crossing a redelivery) finds
# nothing and turns the motor again.
#
# Gifts turn while the two streams refuse writes; then the limits are
# lifted.  Each gift ends with one GiftAck, its completion marker, and no
# command repeated.  Then the marker alone is lost, its GiftAck stored and
# the ack lost: the redelivery is found done by the GiftAck.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftDispatch;
use GiftTB;

my $JSON = $GiftTest::JSON;
my $dir = GiftTest::tempdir();
my $nats = GiftTest::start_nats(dir => $dir);
my $st = GiftTB::start_stack(dir => $dir, motors => 2,
    motor_args => [ '--latency-ms', '2-8' ], tbsim_args => [ '--latency-ms', '2-8' ]);
my $tb = $st->{motors};
my $rules = "    rule = (\n"
    . qq(        { gift = "G1"; device = "motor_01"; },\n)
    . qq(        { gift = "G2"; device = "motor_02"; }\n) . "    );\n";
my $d = GiftDispatch::start_dispatcher(dir => $dir, nats_url => $nats->url,
    mqtt_port => $st->{port}, extra_mqtt => $st->conf(1), rules => $rules,
    rpc_timeout_ms => 1000,
    extra_nats => 'ack_wait_ms = 3000; publish_retry_ms = 200;',
    extra_devices => 'coalesce_max_events = 4;');

my (%want, @ids);
my $batch = sub {
    my ($n, $tag) = @_;
    my @g;
    for my $i (1 .. $n) {
        my $k = 1 + $i % 2;
        my $g = GiftDispatch::gift(giftName => "G$k", diamond => 1 + $i % 5,
            quantity => 1, eventId => "$tag-$i");
        $want{"motor_0$k"} += $g->{diamond};
        push @ids, $g->{eventId};
        push @g, $g;
    }
    return @g;
};
my $sum = sub { my $s = 0; $s += $_ for values %{$_[0]}; $s };
my $motors = sub {
    my $t = $tb->totals->{devices};
    return { map { $_ => $t->{$_}{rounds} } keys %$t };
};
my $acks = sub { scalar GiftDispatch::acks($nats->url) };

# A stream's max_msgs: its message count now (discard new: nothing more
# is stored), or -1 again.
my $limit = sub {
    my ($stream, $max) = @_;
    my $c = GiftDispatch::NatsClient->new($nats->url);
    my ($info) = $c->requests("\$JS.API.STREAM.INFO.$stream", '');
    my $si = $JSON->decode($info);
    $si->{config}{max_msgs} = $max // $si->{state}{messages};
    my ($r) = $c->requests("\$JS.API.STREAM.UPDATE.$stream",
        $JSON->encode($si->{config}));
    $c->close;
    my $u = eval { $JSON->decode($r // '') } // {};
    ok(!$u->{error}, "$stream: max_msgs $si->{config}{max_msgs}")
        or diag $r;
};

# a first batch, so that both streams hold something (max_msgs 0 would
# mean no limit)
GiftDispatch::js_publish_gifts($nats->url, $batch->(20, 'warm'));
ok(GiftTest::wait_until(30, sub { $acks->() >= 20 }, 0.1),
    'first gifts acknowledged');

$limit->('GIFT_ACKS');
$limit->('KV_GIFT_DONE');
GiftDispatch::js_publish_gifts($nats->url, $batch->(60, 'lost'));
ok(GiftTest::wait_until(30, sub {
    $sum->($motors->()) >= $sum->(\%want)
}, 0.1), 'the motors turned for every gift while nothing could be stored');
ok(GiftTest::wait_until(10, sub {
    $d->log_text =~ /publish to gift\.acks\.\S+ for lost-\d+ failed/
}, 0.1), 'their GiftAcks failed and are retried');
# the markers' bucket first: opened the other way round, a retry between
# the two would store a GiftAck whose marker was refused (the case of the
# second part below, where a redelivery finds the GiftAck instead)
$limit->('KV_GIFT_DONE', -1);
$limit->('GIFT_ACKS', -1);

ok(GiftTest::wait_until(30, sub { $acks->() >= @ids }, 0.1),
    'stored once the streams take writes again');
ok(GiftTest::wait_until(15, sub {
    GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 0
}, 0.1), 'every gift acked');
my @acks = GiftDispatch::acks($nats->url);
my %seen;
$seen{$_->{ack}{event_id}}++ for @acks;
is(scalar @acks, scalar @ids, 'one GiftAck per gift');
is(scalar(grep { !$seen{$_} } @ids), 0, 'none missing');
my %marked = map {
    $_->{subject} =~ /^\$KV\.GIFT_DONE\.((?:warm|lost)-\d+)$/ ? ($1 => 1) : ()
} GiftDispatch::stream_messages($nats->url, 'KV_GIFT_DONE');
my @unmarked = grep { !$marked{$_} } @ids;
is(scalar @unmarked, 0, 'every gift has its completion marker')
    or diag "no marker: @unmarked";
is_deeply($motors->(), \%want, 'per-device rounds exact');
is($tb->totals->{totals}{duplicates}, 0, 'no command repeated');

is($d->stop('TERM', 15), 0, 'SIGTERM: exit 0');

# The marker lost, the GiftAck stored, and the consumer's ack lost.  A
# server that stops runs its streams down one by one: the marker can find
# GIFT_DONE gone while GIFT_ACKS still stores the GiftAck sent just after
# it and answers its PubAck, and the ack goes nowhere.  Here KV_GIFT_DONE
# refuses writes and the failpoint exits just before the ack.  The
# redelivery finds no marker; GIFT_ACKS' duplicate window says the gift
# was done, and no command goes out again.
$limit->('KV_GIFT_DONE');
my $dup0 = $tb->totals->{totals}{duplicates};
{
    local $ENV{GIFT_DISPATCHER_FAILPOINT} = 'exit_before_ack=1';
    $d->start;
}
my $g = GiftDispatch::gift(giftName => 'G1', diamond => 7, quantity => 1,
    eventId => 'nomark-1');
$want{motor_01} += 7;
push @ids, 'nomark-1';
is(GiftDispatch::js_publish_gifts($nats->url, $g), 1, 'a gift stored');
ok(GiftTest::wait_until(20, sub { !GiftTest::alive($d->pid) }, 0.05),
    'the dispatcher exited just before its ack') or diag $d->log_text;
$d->stop('KILL', 5);
ok((grep { $_->{ack}{event_id} eq 'nomark-1' }
    GiftDispatch::acks($nats->url)), '... its GiftAck is stored');
ok(!(grep { $_->{subject} =~ /\.nomark-1$/ }
    GiftDispatch::stream_messages($nats->url, 'KV_GIFT_DONE')),
    '... its completion marker is not');
$limit->('KV_GIFT_DONE', -1);
# the redelivery: found done by its GiftAck, and an empty marker written;
# the failpoint loses this ack too
{
    local $ENV{GIFT_DISPATCHER_FAILPOINT} = 'exit_before_ack=1';
    $d->start;
}
ok(GiftTest::wait_until(20, sub { !GiftTest::alive($d->pid) }, 0.05),
    'the redelivery: exited before its ack again') or diag $d->log_text;
$d->stop('KILL', 5);
like($d->log_text, qr/event nomark-1 \(seq \d+, delivery \d+\) was done already \(its GiftAck is stored\)/,
    '... found done by its stored GiftAck');
my ($mk) = grep { $_->{subject} =~ /\.nomark-1$/ }
    GiftDispatch::stream_messages($nats->url, 'KV_GIFT_DONE');
ok($mk && length($mk->{data} // '') == 0,
    '... and an empty marker now says so (for redeliveries past the '
    . 'duplicate window)');
# the next redelivery: the empty marker answers
$d->start;
ok(GiftTest::wait_until(15, sub {
    GiftDispatch::consumer_state($nats->url)->{num_ack_pending} == 0
        && $d->log_text =~ /nomark-1/
}, 0.1), 'the next redelivery is acked');
like($d->log_text, qr/event nomark-1 \(seq \d+, delivery \d+\) was done already \(its marker says its GiftAck is stored\)/,
    '... found done by the empty marker');
is($tb->totals->{totals}{duplicates} - $dup0, 0,
    'no command went out again');
is_deeply($motors->(), \%want, 'per-device rounds exact');
is(scalar(grep { $_->{ack}{event_id} eq 'nomark-1' }
    GiftDispatch::acks($nats->url)), 1, 'one GiftAck');
is($d->stop('TERM', 15), 0, 'SIGTERM: exit 0');
$st->stop;
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
done_testing();
