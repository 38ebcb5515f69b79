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
# command repeated.

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
$limit->('GIFT_ACKS', -1);
$limit->('KV_GIFT_DONE', -1);

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
$st->stop;
is_deeply([ GiftDispatch::sanitizer_reports(GiftTest::slurp($_)) ], [],
    "no sanitizer report in $_") for glob("$dir/dispatcher-*.log");
done_testing();
