#!/usr/bin/perl
# GIFTS full (a test stream with a small max_msgs; discard new): new gifts
# get 503 stream_full with Retry-After, nothing already stored is dropped,
# a retry of a stored gift still gets its 202 (duplicate), and once the
# operator makes room the refused gifts are accepted.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;
use GiftFaults;

my $MAX = 20;

my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup', '--events-max-msgs',
    $MAX);
is($rc, 0, "giftctl setup --events-max-msgs $MAX") or diag $out;
my $cfg = GiftFaults::js_stream_info($nats->url, 'GIFTS')->{config};
is($cfg->{max_msgs}, $MAX, 'GIFTS max_msgs');
is($cfg->{discard}, 'new', 'GIFTS discards new messages, never old ones');

my $ngx = GiftTest::start_nginx(nats_url => $nats->url, workers => 2);
is(scalar(GiftFaults::workers_ready($ngx)), 2, 'workers connected to NATS');

# --- fill all but 5 places, one gift at a time
my (@acc, %gift_of);
for my $i (1 .. $MAX - 5) {
    my $g = GiftTest::gift();
    my ($st, $b) = GiftTest::post_gift($ngx->port, $g);
    push @acc, [$g->{eventId}, $b->{seq}] if $st == 202;
    $gift_of{$g->{eventId}} = $g;
}
is(scalar @acc, $MAX - 5, 'the first gifts accepted');
is_deeply([map { $_->[1] } @acc], [1 .. $MAX - 5], 'at seqs 1..' . ($MAX - 5));

# --- 40 at once for the last 5 places: 5 accepted, the rest refused
my @gifts = map { GiftTest::gift() } 1 .. 40;
$gift_of{$_->{eventId}} = $_ for @gifts;
my @r = GiftTest::post_many($ngx->port, 10, @gifts);
my (%by, @refused);
for (@r) {
    my ($id, $st, $body) = @$_;
    my $b = eval { $GiftTest::JSON->decode($body) } // {};
    my $code = $st == 202 ? 202 : "$st " . ($b->{error} // $body);
    $by{$code}++;
    push @acc, [$id, $b->{seq}] if $st == 202;
    push @refused, $id if $code eq '503 stream_full';
}
is_deeply(\%by, { 202 => 5, '503 stream_full' => 35 },
    '5 accepted, 35 refused with stream_full') or diag explain \%by;

# --- one more, looked at closely
my $late = GiftTest::gift();
my ($st, $b, $res) = GiftTest::post_gift($ngx->port, $late);
is($st, 503, 'a full stream answers 503');
is($b->{error}, 'stream_full', 'error stream_full');
like($b->{message}, qr/\S/, 'with a message');
is($res->{headers}{'retry-after'}, '1', 'Retry-After: 1');
like($res->{headers}{'content-type'}, qr{^application/json}, 'JSON body');
push @refused, $late->{eventId};
$gift_of{$late->{eventId}} = $late;

# --- a retry of a stored gift is still recognized
my ($id1) = @{$acc[0]};
($st, $b) = GiftTest::post_gift($ngx->port, $gift_of{$id1});
is($st, 202, 'a retry of a stored gift: 202 even when full');
is_deeply($b, { id => $id1, seq => 1, duplicate => JSON::PP::true },
    'duplicate, with the original seq');

# --- nothing dropped: the first gifts are all still there
my $info = GiftFaults::js_stream_info($nats->url, 'GIFTS')->{state};
is($info->{messages}, $MAX, "GIFTS holds $MAX messages");
is($info->{first_seq}, 1, 'from seq 1 (the oldest kept)');
is($info->{last_seq}, $MAX, "to seq $MAX");
is(GiftTest::stream_info($nats->url)->{GIFTS}{messages}, $MAX,
    'giftctl info agrees');
my @bad = GiftFaults::check_accepted_stored($nats->url, \@acc);
is(scalar @bad, 0, 'every 202 at its seq') or diag explain \@bad;
@bad = GiftFaults::check_with_giftctl($nats->url, $MAX, @acc);
is(scalar @bad, 0, 'giftctl get agrees, all ' . $MAX) or diag explain \@bad;
my $m = GiftTest::stored($nats->url, 'GIFTS', 1);
is($m->{event}{userId}, $gift_of{$id1}{userId}, 'seq 1 is the first gift');

my $warns = () = GiftTest::slurp($ngx->error_log)
    =~ /refused: stream full \(maximum messages/g;
is($warns, scalar @refused, 'each refusal logged with the server\'s reason');

# --- the operator makes room (raises max_msgs): the refused are accepted
$cfg->{max_msgs} = 100;
my $nc = GiftFaults::NatsClient->new($nats->url);
my $up = $nc->request('$JS.API.STREAM.UPDATE.GIFTS',
    $GiftTest::JSON->encode($cfg));
$nc->disconnect;
is($up->{config}{max_msgs}, 100, 'GIFTS max_msgs raised to 100')
    or diag explain $up;
my @again = GiftTest::post_many($ngx->port, 6,
    map { $gift_of{$_} } @refused);
is(scalar(grep { $_->[1] == 202 && $_->[2] =~ /"duplicate":false/ } @again),
    scalar @refused, 'the refused gifts accepted on retry, none a duplicate');
is(GiftFaults::js_stream_info($nats->url, 'GIFTS')->{state}{messages},
    $MAX + @refused, 'GIFTS holds every gift once');

is($ngx->stop, 0, 'nginx exits cleanly');
is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');

done_testing();
