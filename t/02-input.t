#!/usr/bin/perl
# Webhook input end to end (real nginx with 2 workers + nats-server): every
# class of input of docs/design.md and docs/input.md gets its documented status,
# error code and field; the accepted ones are normalized as documented in
# GIFTS; the refused ones change nothing.  At the end GIFTS holds exactly the
# accepted gifts, and nginx is still healthy.

use strict;
use warnings;
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time);
use lib 't/lib';
use GiftTest;

my $nats = GiftTest::start_nats();
my ($out, $rc) = GiftTest::giftctl($nats->url, 'setup');
is($rc, 0, 'giftctl setup') or diag $out;

# /gift as in nginx.conf.example (module limit 64k, nginx limit 1m, bodies
# kept in memory); /gift-big lets 1 MB bodies reach the normalizer (and go
# through a temporary file: the default client_body_buffer_size).
# nginx's workers (nobody, when the test runs as root) must reach the body
# temporary files under the test directory, which tempdir() makes 0700.
my $ngx_dir = GiftTest::tempdir();
chmod 0711, $ngx_dir;
my $ngx = GiftTest::start_nginx(
    dir => $ngx_dir,
    nats_url => $nats->url,
    workers => 2,
    webhook => 'gift_webhook_max_body 64k; client_body_buffer_size 64k; '
        . 'client_max_body_size 1m;',
    # short enough for the slowloris section to see nginx cut them off
    http => 'client_header_timeout 2s;',
    server => <<'EOF',
        location = /gift-slow {
            gift_webhook;
            client_body_timeout 2s;
        }
        location = /gift-big {
            gift_webhook;
            gift_webhook_max_body 2m;
            client_max_body_size 4m;
        }
        error_page 413 = @gift_too_large;
        location @gift_too_large {
            default_type application/json;
            return 413 '{"error":"body_too_large","message":"the body is larger than the server accepts"}\n';
        }
EOF
);
ok(GiftTest::wait_until(10, sub {
    my @n = GiftTest::slurp($ngx->error_log) =~ /connected to NATS/g;
    @n >= 2;
}), 'both workers connected to NATS');

my $port = $ngx->port;
my $BIG = $ngx->url('/gift-big');
my $JSON = $GiftTest::JSON;

# ------------------------------------------------------------ helpers

my %good;       # event id => GIFTS seq, for every gift that must be stored
my $n = 0;

# A canonical body as text, members in order; canon(k => raw JSON text, ...)
# overrides (undef removes); '_raw' is appended verbatim before the '}'.
sub canon {
    my @over = @_;
    $n++;
    my @order = qw(event platform userId giftName diamond quantity timestamp
        eventId);
    my %v = (event => '"gift"', platform => '"tiktok"',
        userId => '"user_123"', giftName => '"Motor"', diamond => 10,
        quantity => 1, timestamp => 1700000000000,
        eventId => qq("in-$$-$n"));
    my $raw = '';
    while (my ($k, $val) = splice(@over, 0, 2)) {
        if ($k eq '_raw') {
            $raw .= $val;
            next;
        }
        push @order, $k unless exists $v{$k};
        $v{$k} = $val;
    }
    return '{' . join(',', map { qq("$_":$v{$_}) }
        grep { defined $v{$_} } @order) . $raw . '}';
}

sub str { '"' . $_[0] . '"' }           # raw bytes in quotes, no escaping

# GiftTest::post_gift without its shared keep-alive connection: on a reused
# connection each request waits ~40 ms for a delayed ACK (HTTP::Tiny writes
# headers and body separately); a fresh one does not, and spreads the
# requests over both workers.
sub post_url {
    my ($url, $body, %h) = @_;
    $h{'Content-Type'} //= 'application/json';
    my $res = HTTP::Tiny->new(timeout => 10, keep_alive => 0)->request('POST',
        $url, { content => $body, headers => \%h });
    my $d = eval { $JSON->decode($res->{content}) };
    return ($res->{status}, $d // $res->{content}, $res);
}

sub post { post_url("http://127.0.0.1:$port/gift", @_) }

sub printable { defined $_[0] && $_[0] =~ /^[\x20-\x7e]+$/ }

# An accepted gift: 202, a fresh id (or the expected one), recorded.
sub accepted {
    my ($name, $body, %o) = @_;
    my ($st, $d, $res) = $o{url} ? post_url($o{url}, $body)
        : post($body, %{$o{headers} // {}});
    my $ok = is($st, 202, "$name: 202");
    $ok &&= ok(ref $d && $d->{seq} && !$d->{duplicate},
        "$name: stored, not a duplicate");
    $ok &&= is($d->{id}, $o{id}, "$name: id") if defined $o{id};
    diag explain $d unless $ok;
    return undef unless ref $d && $d->{id};
    $good{$d->{id}} = $d->{seq};
    return $d;
}

# A refused body: status, error code, field (undef: no field), nothing stored.
sub refused {
    my ($name, $body, $status, $field, %o) = @_;
    my ($st, $d, $res) = $o{url} ? post_url($o{url}, $body,
        %{$o{headers} // {}}) : post($body, %{$o{headers} // {}});
    my %code = (400 => 'invalid_json', 422 => 'invalid_field',
        413 => 'body_too_large', 415 => 'unsupported_media_type',
        405 => 'method_not_allowed');
    my $ok = is($st, $status, "$name: $status");
    $ok &&= is(ref $d && $d->{error}, $o{code} // $code{$status},
        "$name: error code");
    if (defined $field) {
        $ok &&= is($d->{field}, $field, "$name: field $field");
    } else {
        $ok &&= ok(!exists $d->{field}, "$name: no field");
    }
    $ok &&= ok(printable($d->{message}), "$name: printable message");
    $ok &&= like($res->{headers}{'content-type'} // '',
        qr{^application/json}, "$name: JSON answer");
    diag explain($d) unless $ok;
    return $d;
}

# A raw HTTP/1.1 exchange on a fresh connection ("Connection: close"):
# returns (status, decoded body or raw, headers).
sub raw_http {
    my ($req) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $port, Proto => 'tcp', Timeout => 5)
        or die "connect: $!";
    local $SIG{PIPE} = 'IGNORE';
    my $sel = IO::Select->new($s);
    my ($off, $resp) = (0, '');
    while ($off < length $req) {
        # read what nginx has already answered (an early 413), not to block
        if ($sel->can_read(0)) {
            my $r = sysread($s, $resp, 65536, length $resp);
            last unless $r;
        }
        last unless $sel->can_write(5);
        my $w = syswrite($s, $req, 65536, $off);
        last unless $w;
        $off += $w;
    }
    # until nginx closes, or the answer is complete (after an early 413
    # nginx lingers, reading the rest of a body that will not come)
    my $end = time + 10;
    while (time < $end && !complete($resp) && $sel->can_read($end - time)) {
        my $r = sysread($s, $resp, 65536, length $resp);
        last unless $r;
    }
    close $s;
    my ($head, $body) = split /\r\n\r\n/, $resp, 2;
    $head //= '';
    my ($st) = $head =~ m{^HTTP/1\.[01] (\d{3})};
    my %h;
    for (split /\r\n/, $head) {
        $h{lc $1} = $2 if /^([^:]+):\s*(.*)$/;
    }
    $body //= '';
    if (($h{'transfer-encoding'} // '') =~ /chunked/i) {
        my $b = '';
        while ($body =~ s/^([0-9a-fA-F]+)\r\n//) {
            my $len = hex $1;
            last if $len == 0;
            $b .= substr($body, 0, $len, '');
            $body =~ s/^\r\n//;
        }
        $body = $b;
    }
    my $d = eval { $JSON->decode($body) };
    return ($st // 0, $d // $body, \%h);
}

sub complete {
    my ($resp) = @_;
    my $i = index($resp, "\r\n\r\n");
    return 0 if $i < 0;
    my $head = substr($resp, 0, $i);
    return length($resp) >= $i + 4 + $1
        if $head =~ /^Content-Length:\s*(\d+)/mi;
    return $resp =~ /\r\n0\r\n\r\n\z/ if $head =~ /^Transfer-Encoding:\s*chunked/mi;
    return 0;
}

sub chunked_request {
    my ($path, $ct, @chunks) = @_;
    my $r = "POST $path HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        . "Content-Type: $ct\r\nTransfer-Encoding: chunked\r\n\r\n";
    $r .= sprintf("%x\r\n%s\r\n", length $_, $_) for grep { length } @chunks;
    return $r . "0\r\n\r\n";
}

# ------------------------------------------------------------ canonical

{
    my $body = canon();
    (my $id = $body) =~ s/.*"eventId":"([^"]+)".*/$1/;
    my $d = accepted('canonical with eventId', $body, id => $id);
    my $m = GiftTest::stored($nats->url, 'GIFTS', $d->{seq});
    is($m->{subject}, 'gift.events.tiktok', 'subject gift.events.tiktok');
    is($m->{headers}{'Nats-Msg-Id'}, $id, 'Nats-Msg-Id is the eventId');
    is_deeply([@{$m->{event}}{qw(eventId platform userId giftName diamond
        quantity occurredAtMs streakId streakCount streakEnd)}],
        [$id, 'tiktok', 'user_123', 'Motor', 10, 1, 1700000000000, '', 1,
         JSON::PP::true], 'canonical normalized');
    my ($st, $d2) = post($body);
    is($st, 202, 'retry with the same eventId: 202');
    is_deeply($d2, { id => $id, seq => $d->{seq}, duplicate => JSON::PP::true },
        'retry: duplicate, same seq');
}

# docs/design.md's example, without eventId: the id comes from the content.
my $example = '{"event":"gift","platform":"tiktok","userId":"user_123",'
    . '"giftName":"Motor","diamond":10,"quantity":1,'
    . '"timestamp":1700000000000}';
{
    my $d = accepted('canonical without eventId', $example);
    like($d->{id}, qr/^h:[0-9a-f]{32}$/, 'derived id h:<32 hex>');
    my ($st, $d2) = post($example);
    is($st, 202, 'identical retry without eventId: 202');
    is_deeply($d2, { id => $d->{id}, seq => $d->{seq},
        duplicate => JSON::PP::true }, 'identical retry deduplicated');
    my $reordered = qq( {\n  "timestamp": 1700000000000, "quantity":1,)
        . qq( "diamond" : 10, "giftName":"Motor", "userId":"user_123",)
        . qq( "platform":"tiktok", "event":"gift"\n}\n);
    ($st, $d2) = post($reordered);
    is_deeply([$st, $d2], [202, { id => $d->{id}, seq => $d->{seq},
        duplicate => JSON::PP::true }],
        'retry with other key order and spacing deduplicated');
    (my $later = $example) =~ s/1700000000000/1700000000001/;
    my $d3 = accepted('same gift, another timestamp', $later);
    isnt($d3->{id}, $d->{id}, 'another timestamp: another id');
    my $m = GiftTest::stored($nats->url, 'GIFTS', $d->{seq});
    is($m->{headers}{'Nats-Msg-Id'}, $d->{id}, 'derived id is the Nats-Msg-Id');
    is($m->{event}{eventId}, $d->{id}, 'derived id stored');
}

{
    my $d = accepted('canonical with every optional field', canon(
        userName => '"Ann"', giftId => '"g1"', roomId => '7435987243521837870',
        userId => '123'));
    my $e = GiftTest::stored($nats->url, 'GIFTS', $d->{seq})->{event};
    is_deeply([@$e{qw(userId userName giftId roomId)}],
        ['123', 'Ann', 'g1', '7435987243521837870'],
        'optional fields; integer ids in decimal');
    accepted('unknown fields ignored, nesting below the limit', canon(
        _raw => ',"extra":{"a":[1,2.5,"x",null,true,{"b":[[[1]]]}]},'
        . '"zz":1.5e3,"deep":' . ('[' x 1000) . (']' x 1000)));
    accepted('null and "" optional fields are absent',
        canon(userName => '""', roomId => 'null', giftId => '""'));
    accepted('application/json; charset=utf-8', canon(),
        headers => { 'Content-Type' => 'application/json; charset=utf-8' });
    accepted('APPLICATION/JSON', canon(),
        headers => { 'Content-Type' => 'APPLICATION/JSON' });
    accepted('another platform', canon(platform => '"youtube"'));
}

# ------------------------------------------------------------ streak frames

{
    my $sid = "streak-$$";
    my @seq;
    for my $f ([1, 'false'], [2, 'false'], [3, 'true']) {
        my $d = accepted("canonical streak frame $f->[0]", canon(
            quantity => $f->[0], streakId => str($sid), streakEnd => $f->[1]));
        push @seq, $d->{seq};
    }
    my @e = map { GiftTest::stored($nats->url, 'GIFTS', $_)->{event} } @seq;
    is_deeply([map { [@$_{qw(streakId quantity streakCount)},
        $_->{streakEnd} ? 1 : 0] } @e],
        [[$sid, 1, 1, 0], [$sid, 2, 2, 0], [$sid, 3, 3, 1]],
        'streak frames: id, running count, end only on the last');
    my $d = accepted('streakEnd as 1', canon(streakId => str($sid . 'b'),
        streakEnd => 1));
    ok(GiftTest::stored($nats->url, 'GIFTS', $d->{seq})->{event}{streakEnd},
        'streakEnd 1 is true');
}

# ------------------------------------------------------------ TikTok fixtures

my $fixdir = GiftTest::root() . '/t/fixtures/tiktok';
my $U = "\xc3\x9cn\xc3\xafcode \xf0\x9f\x8c\x9f fan";     # UTF-8 bytes
my $RS1 = 'tiktok:6813181309701719620:5655:1731000000000';
my $RS0 = 'tiktok:6813181309701719620:5655:1661887131074';
# eventId userId userName giftId giftName diamond quantity streakId
# streakEnd roomId occurredAtMs [first fixture with that msgId]
my %fx = (
    flat_legacy25_galaxy => ['tt:7435990223456789001', '7230000000000000001',
        $U, '11046', 'Galaxy', 1000, 1, '', 1, '7435987243521837870',
        1731000010789],
    flat_legacy25_rose_progress => ['tt:7435990123456789012',
        '6813181309701719620', 'Zerody Tester', '5655', 'Rose', 1, 3, $RS1, 0,
        '7435987243521837870', 1731000000123],
    flat_v1_galaxy => ['tt:7137749190944239001', '7230000000000000001', $U,
        '11046', 'Galaxy', 1000, 1, '', 1, '', 1661887140500],
    flat_v1_numeric_ids => ['tt:7137749190944230222', '6813181309701719620',
        'Zerody Tester', '5655', 'Rose', 1, 4, $RS0, 1, '', 1661887136011],
    flat_v1_rose_end => ['tt:7137749190944230222', '6813181309701719620',
        'Zerody Tester', '5655', 'Rose', 1, 4, $RS0, 1, '', 1661887136011,
        'flat_v1_numeric_ids'],
    flat_v1_rose_progress => ['tt:7137749190944230150', '6813181309701719620',
        'Zerody Tester', '5655', 'Rose', 1, 2, $RS0, 0, '', 1661887134397],
    v2_0_finger_heart_end => ['tt:7300000000000000777', '6813181309701719620',
        'Zerody Tester', '5487', 'Finger Heart', 5, 7,
        'tiktok:6813181309701719620:5487:1700000000001', 1, '',
        1700000000456],
    v2_1_perfume_progress => ['tt:7400000000000000321', '7111111111111111111',
        'Perfume Giver', '5658', 'Perfume', 20, 1,
        'tiktok:7111111111111111111:5658:1720000000000', 0,
        '7399999999999999999', 1720000000789],
    v2_galaxy => ['tt:7435990223456789001', '7230000000000000001', $U,
        '11046', 'Galaxy', 1000, 1, '', 1, '7435987243521837870',
        1731000010789, 'flat_legacy25_galaxy'],
    v2_numeric_ids => ['tt:7435990123456789099', '6813181309701719620',
        'Zerody Tester', '5655', 'Rose', 1, 5, $RS1, 1,
        '7435987243521837870', 1731000002456],
    v2_rose_end => ['tt:7435990123456789099', '6813181309701719620',
        'Zerody Tester', '5655', 'Rose', 1, 5, $RS1, 1,
        '7435987243521837870', 1731000002456, 'v2_numeric_ids'],
    v2_rose_progress => ['tt:7435990123456789012', '6813181309701719620',
        'Zerody Tester', '5655', 'Rose', 1, 3, $RS1, 0,
        '7435987243521837870', 1731000000123, 'flat_legacy25_rose_progress'],
);
my @files = map { m{/([^/]+)\.json$} } sort glob "$fixdir/*.json";
is_deeply([sort grep { $_ ne 'flat_legacy25_no_extended' } @files],
    [sort keys %fx], 'every fixture has an expectation');

sub fx_fields {
    my ($e) = @_;
    return [@$e{qw(eventId userId userName giftId giftName diamond quantity
        streakId)}, $e->{streakEnd} ? 1 : 0, @$e{qw(roomId occurredAtMs)},
        $e->{platform}, $e->{streakCount}];
}

my %fx_seq;
for my $f (@files) {
    my $body = GiftTest::slurp("$fixdir/$f.json");
    if ($f eq 'flat_legacy25_no_extended') {
        # 2.x's legacy converter drops the gift struct: no diamond count
        refused("fixture $f", $body, 422, 'diamondCount');
        next;
    }
    my $x = $fx{$f};
    my ($st, $d) = post($body);
    is($st, 202, "fixture $f: 202");
    is($d->{id}, $x->[0], "fixture $f: id $x->[0]");
    if (my $first = $x->[11]) {
        # the same TikTok message in another form: deduplicated by msgId
        is_deeply([$d->{duplicate}, $d->{seq}],
            [JSON::PP::true, $fx_seq{$first}],
            "fixture $f: duplicate of $first");
    } else {
        ok(!$d->{duplicate}, "fixture $f: new");
        $fx_seq{$f} = $d->{seq};
        $good{$d->{id}} = $d->{seq};
    }
    my $m = GiftTest::stored($nats->url, 'GIFTS', $d->{seq});
    is($m->{subject}, 'gift.events.tiktok', "fixture $f: subject");
    is_deeply(fx_fields($m->{event}), [@$x[0 .. 10], 'tiktok', $x->[6]],
        "fixture $f: normalized fields") or diag explain $m->{event};

    # the same body under its own eventId: the stored fields of this very
    # form (the msgId duplicates above hold the first form's)
    (my $own = $body) =~ s/^\s*\{/{"eventId":"fx-$f",/;
    $d = accepted("fixture $f with an eventId", $own, id => "fx-$f");
    $m = GiftTest::stored($nats->url, 'GIFTS', $d->{seq});
    is_deeply(fx_fields($m->{event}),
        ["fx-$f", @$x[1 .. 10], 'tiktok', $x->[6]],
        "fixture $f: its own fields") or diag explain $m->{event};
}

# TikTok bounds and errors, on reduced events
sub flat {
    my (%o) = @_;
    my %v = (userId => '"6813181309701719620"', nickname => '"Zerody"',
        giftId => 5655, giftName => '"Rose"', diamondCount => 1,
        repeatCount => 2, repeatEnd => 'false', giftType => 1,
        groupId => '"1661887131074"', createTime => '"1661887134397"',
        msgId => '"7137749190944230150"', %o);
    return '{' . join(',', map { qq("$_":$v{$_}) }
        grep { defined $v{$_} } sort keys %v) . '}';
}
sub v2 {
    my (%o) = @_;
    my %user = (idStr => '"6813181309701719620"', nickname => '"Zerody"',
        %{$o{user} // {}});
    my %gift = (id => '"5655"', name => '"Rose"', diamondCount => 1,
        type => 1, %{$o{gift} // {}});
    my %common = (msgId => '"7435990123456789012"',
        roomId => '"7435987243521837870"', createTime => '"1731000000123"',
        %{$o{common} // {}});
    my $obj = sub {
        my ($h) = @_;
        '{' . join(',', map { qq("$_":$h->{$_}) }
            grep { defined $h->{$_} } sort keys %$h) . '}';
    };
    delete @o{qw(user gift common)};
    my %v = (repeatCount => 3, repeatEnd => 0, groupId => '"1731000000000"',
        user => $obj->(\%user), gift => $obj->(\%gift),
        common => $obj->(\%common), %o);
    return '{' . join(',', map { qq("$_":$v{$_}) }
        grep { defined $v{$_} } sort keys %v) . '}';
}
{
    my $m125 = '7' x 125;
    accepted('flat msgId of 125 characters', flat(msgId => str($m125)),
        id => "tt:$m125");
    refused('flat msgId of 126 characters', flat(msgId => str('7' x 126)),
        422, 'msgId');
    refused('flat msgId with CR LF', flat(msgId => '"1\r\nX-Evil: 1"'),
        422, 'msgId');
    refused('2.x msgId with a space', v2(common => { msgId => '"1 2"' }),
        422, 'common.msgId');
    refused('flat without userId', flat(userId => undef), 422, 'userId');
    refused('2.x without a user id', v2(user => { idStr => undef }),
        422, 'user.userId');
    refused('2.x user id true', v2(user => { userId => 'true' }),
        422, 'user.userId');
    refused('flat diamondCount 1.0', flat(diamondCount => '1.0'),
        422, 'diamondCount');
    refused('flat diamondCount "1"', flat(diamondCount => '"1"'),
        422, 'diamondCount');
    refused('2.x gift.diamondCount 0', v2(gift => { diamondCount => 0 }),
        422, 'gift.diamondCount');
    refused('2.x gift.diamondCount 1000001',
        v2(gift => { diamondCount => 1000001 }), 422, 'gift.diamondCount');
    refused('flat repeatCount 2.5', flat(repeatCount => '2.5'),
        422, 'repeatCount');
    refused('flat repeatCount 100001', flat(repeatCount => 100001),
        422, 'repeatCount');
    refused('flat repeatCount -1', flat(repeatCount => -1),
        422, 'repeatCount');
    refused('flat repeatEnd "yes"', flat(repeatEnd => '"yes"'),
        422, 'repeatEnd');
    refused('2.x repeatEnd 2', v2(repeatEnd => 2), 422, 'repeatEnd');
    refused('flat createTime not digits', flat(createTime => '"17e11"'),
        422, 'createTime');
    refused('2.x common.createTime negative',
        v2(common => { createTime => -5 }), 422, 'common.createTime');
    refused('TikTok event with another platform',
        flat(platform => '"youtube"'), 422, 'platform');
    refused('flat userId of 257 bytes', flat(userId => str('1' x 257)),
        422, 'userId');
    my $d = accepted('2.x with gift id as a JSON integer and 64-bit ids',
        v2(giftId => 5655, msgId => undef, user => { idStr => undef,
            id => 6813181309701719620 },
            common => { msgId => 7435990123456700001 }),
        id => 'tt:7435990123456700001');
    my $e = GiftTest::stored($nats->url, 'GIFTS', $d->{seq})->{event};
    is_deeply([@$e{qw(userId giftId streakId quantity)}],
        ['6813181309701719620', '5655', $RS1, 3],
        '2.x numeric ids written in decimal');
    $d = accepted('flat without msgId: derived id',
        flat(msgId => undef, repeatCount => 9));
    like($d->{id}, qr/^h:[0-9a-f]{32}$/, 'flat without msgId: h: id');
}

# ------------------------------------------------------------ bounds

my $S256 = 'abcdefghijklmnop' x 16;
my $STAR256 = "\xf0\x9f\x8c\x9f" x 64;          # 256 bytes, 64 characters
{
    my %b;
    for my $c (
        [diamond => 1], [diamond => 1000000],
        [quantity => 1], [quantity => 100000],
        [timestamp => 0], [timestamp => 32503679999999],
    ) {
        my $d = accepted("$c->[0] $c->[1]", canon(@$c));
        my $e = GiftTest::stored($nats->url, 'GIFTS', $d->{seq})->{event};
        my $k = $c->[0] eq 'timestamp' ? 'occurredAtMs' : $c->[0];
        is($e->{$k}, $c->[1], "$c->[0] $c->[1] stored");
    }
    for my $c (
        [diamond => 0], [diamond => 1000001], [diamond => -1],
        [quantity => 0], [quantity => 100001], [quantity => -1],
        [timestamp => -1], [timestamp => 32503680000000],
    ) {
        refused("$c->[0] $c->[1]", canon(@$c), 422, $c->[0]);
    }

    # strings: 1 and 256 bytes in, 0 (required ones) and 257 bytes out
    for my $f (qw(userId userName giftId giftName roomId)) {
        for my $v ('x', $S256, $STAR256) {
            my $d = accepted(sprintf('%s of %d bytes%s', $f, length $v,
                $v =~ /^[\x00-\x7f]*$/ ? '' : ' (4-byte UTF-8)'),
                canon($f => str($v)));
            is(GiftTest::stored($nats->url, 'GIFTS', $d->{seq})->{event}{$f},
                $v, "$f stored intact") if $d;
        }
        refused("$f of 257 bytes", canon($f => str($S256 . 'x')), 422, $f);
        refused("$f of 257 bytes, UTF-8", canon($f => str($STAR256 . 'x')),
            422, $f);
    }
    refused('userId empty', canon(userId => '""'), 422, 'userId');
    refused('giftName empty', canon(giftName => '""'), 422, 'giftName');

    # eventId 1..128 of [A-Za-z0-9._:-]
    my $e128 = substr("id.$$:" . ('A-z_9' x 30), 0, 128);
    accepted('eventId of 128 characters', canon(eventId => str($e128)),
        id => $e128);
    accepted('eventId of 1 character', canon(eventId => '"Z"'), id => 'Z');
    refused('eventId of 129 characters', canon(eventId => str($e128 . 'x')),
        422, 'eventId');
    refused('eventId empty', canon(eventId => '""'), 422, 'eventId');
    refused('eventId with CR LF (header injection)',
        canon(eventId => '"a\r\nNats-Msg-Id: b"'), 422, 'eventId');
    refused('eventId with a raw LF escaped as \u000a',
        canon(eventId => '"a\u000ab"'), 422, 'eventId');
    refused('eventId with a space', canon(eventId => '"a b"'), 422,
        'eventId');
    refused('eventId a number', canon(eventId => 12), 422, 'eventId');
    refused('eventId of 1 MB', canon(eventId => str('e' x 1_000_000)),
        422, 'eventId', url => $BIG);

    # platform [a-z0-9_-]{1,32}: a NATS subject token
    my $p32 = 'a-b_c0123456789abcdefghijklmnopq';
    my $d = accepted('platform of 32 characters', canon(platform => str($p32)));
    is(GiftTest::stored($nats->url, 'GIFTS', $d->{seq})->{subject},
        "gift.events.$p32", 'subject gift.events.<32 characters>');
    accepted('platform of 1 character', canon(platform => '"x"'));
    refused('platform of 33 characters', canon(platform => str($p32 . 'r')),
        422, 'platform');
    refused('platform empty', canon(platform => '""'), 422, 'platform');
    for my $p ('a.b', '*', '>', 'tik tok', 'tiktok.>', 'TikTok', "a\\tb",
        'gift.events.x', "\xc3\xa9")
    {
        refused("platform '$p' (subject injection)", canon(platform => str($p)),
            422, 'platform');
    }
}

# ------------------------------------------------------------ bad input

# missing required fields (canonical)
for my $f (qw(platform userId giftName diamond quantity)) {
    refused("$f missing", canon($f => undef), 422, $f);
}
refused('diamond null (absent)', canon(diamond => 'null'), 422, 'diamond');
refused('event not a gift', canon(event => '"like"'), 422, 'event');

# wrong types, floats, numeric strings, negatives, overflow
for my $c (
    ['diamond true', diamond => 'true'],
    ['diamond an object', diamond => '{}'],
    ['diamond an array', diamond => '[10]'],
    ['diamond 10.0', diamond => '10.0'],
    ['diamond 1e1', diamond => '1e1'],
    ['diamond "10"', diamond => '"10"'],
    ['diamond "NaN"', diamond => '"NaN"'],
    ['diamond 2^32 + 10', diamond => '4294967306'],
    ['diamond INT64_MAX', diamond => '9223372036854775807'],
    ['diamond beyond 64 bits', diamond => '99999999999999999999'],
    ['diamond beyond 64 bits, negative', diamond => '-99999999999999999999'],
    ['diamond 1e400', diamond => '1e400'],
    ['diamond of 20000 digits', diamond => '9' x 20000],
    ['quantity 1.5', quantity => '1.5'],
    ['quantity "1"', quantity => '"1"'],
    ['quantity -0.0', quantity => '-0.0'],
    ['userId a float', userId => '1.5'],
    ['userId negative', userId => '-1'],
    ['userId true', userId => 'true'],
    ['giftName a number', giftName => '7'],
    ['giftName an array', giftName => '["Motor"]'],
    ['platform a number', platform => '1'],
    ['timestamp "1700000000000"', timestamp => '"1700000000000"'],
    ['timestamp 1.7e12', timestamp => '1.7e12'],
    ['roomId negative', roomId => '-3'],
    ['streakId with a space', streakId => '"s 1"'],
)
{
    my ($name, $f, $v) = @$c;
    refused($name, canon($f => $v), 422, $f);
}
refused('streakEnd "yes"', canon(streakId => '"s1"', streakEnd => '"yes"'),
    422, 'streakEnd');
refused('a huge number in an unknown member',
    canon(_raw => ',"extra":{"n":' . ('1' x 30000) . '}'), 422, 'extra.n');

# duplicate keys
refused('duplicate key', canon(_raw => ',"diamond":1000'), 422, 'diamond');
refused('duplicate eventId', canon(_raw => ',"eventId":"other"'), 422,
    'eventId');
refused('duplicate key in a nested object',
    canon(_raw => ',"extra":{"a":{"b":1,"b":2}}'), 422, 'extra.a.b');
refused('duplicate key deeper than 16 levels',
    canon(_raw => ',"x":' . ('{"a":' x 20) . '{"k":1,"k":2}' . ('}' x 20)),
    400, undef);

# invalid UTF-8 and NUL bytes
refused('invalid UTF-8 in giftName', canon(giftName => "\"Mo\xfftor\""),
    422, 'giftName');
refused('truncated UTF-8 in userName', canon(userName => "\"Ann\xc3\""),
    422, 'userName');
refused('overlong UTF-8 in userId', canon(userId => "\"a\xc0\xaf\""),
    422, 'userId');
refused('UTF-16 surrogate in UTF-8', canon(giftName => "\"\xed\xa0\x80\""),
    422, 'giftName');
refused('invalid UTF-8 in a key', canon(_raw => ",\"a\xff\":1"), 400, undef);
refused('raw NUL inside a string', canon(platform => "\"tik\0tok\""),
    400, undef);
refused('raw NUL after the object', canon() . "\0", 400, undef);
refused('raw NUL before the object', "\0" . canon(), 400, undef);
refused('escaped NUL (\u0000)', canon(giftName => '"Mo\u0000tor"'),
    400, undef);
refused('lone surrogate escape', canon(giftName => '"\ud800"'), 400, undef);

# malformed and truncated JSON, NaN tokens
my $full = canon();
for my $c (
    ['empty body', ''],
    ['whitespace only', " \r\n"],
    ['not JSON', 'hello'],
    ['a JSON string', '"gift"'],
    ['an array', "[$full]"],
    ['a number', '10'],
    ['null', 'null'],
    ['trailing garbage', $full . 'x'],
    ['two objects', $full . $full],
    ['trailing comma', canon(_raw => ',')],
    ['comment', canon(_raw => ' /* c */')],
    ['single quotes', "{'event':'gift'}"],
    ['unquoted key', canon(_raw => ',a:1')],
    ['NaN token', canon(diamond => 'NaN')],
    ['Infinity token', canon(diamond => 'Infinity')],
    ['-Infinity token', canon(diamond => '-Infinity')],
    ['leading +', canon(diamond => '+10')],
    ['hex number', canon(diamond => '0x10')],
    ['leading zero', canon(diamond => '010')],
    ['nesting deeper than 2048 (arrays)',
        canon(_raw => ',"deep":' . ('[' x 3000) . (']' x 3000))],
    ['nesting deeper than 2048 (objects)',
        canon(_raw => ',"deep":' . ('{"a":' x 3000) . '1' . ('}' x 3000))],
    ['unclosed nesting', canon(_raw => ',"deep":' . ('[' x 5000))],
    (map { ["truncated at $_", substr($full, 0, $_)] }
        1, 2, 10, int(length($full) / 2), length($full) - 1),
    ['truncated inside a string', substr($full, 0, index($full, 'Motor') + 2)],
)
{
    refused("$c->[0]", $c->[1], 400, undef);
}

# 1 MB strings: refused by size at /gift, by the normalizer at /gift-big
my $mb = 'm' x 1_000_000;
refused('1 MB giftName at /gift: the module\'s limit',
    canon(giftName => str($mb)), 413, undef);
for my $f (qw(giftName userId userName platform)) {
    refused("1 MB $f", canon($f => str($mb)), 422, $f, url => $BIG);
}
accepted('1 MB string in an unknown member', canon(note => str($mb)),
    url => $BIG);
refused('1 MB of nesting', canon(_raw => ',"deep":' . ('[' x 500_000)
    . (']' x 500_000)), 400, undef, url => $BIG);

# ------------------------------------------------------------ HTTP level

for my $m (qw(GET PUT DELETE PATCH)) {
    my $res = HTTP::Tiny->new(timeout => 5)->request($m, $ngx->url('/gift'),
        { content => $m eq 'GET' ? '' : canon(),
          headers => { 'Content-Type' => 'application/json' } });
    is($res->{status}, 405, "$m: 405");
    is($res->{headers}{allow}, 'POST', "$m: Allow: POST");
    my $d = eval { $JSON->decode($res->{content}) } // {};
    is($d->{error}, 'method_not_allowed', "$m: method_not_allowed");
}
{
    my $res = HTTP::Tiny->new(timeout => 5)->request('HEAD',
        $ngx->url('/gift'));
    is($res->{status}, 405, 'HEAD: 405');
    is($res->{headers}{allow}, 'POST', 'HEAD: Allow: POST');
}

for my $ct ('text/plain', 'application/x-www-form-urlencoded',
    'multipart/form-data; boundary=x', 'application/jsonx', 'text/json',
    'application/xml', 'application/vnd.gift+json')
{
    refused("Content-Type $ct", canon(), 415, undef,
        headers => { 'Content-Type' => $ct });
}

# the module's limit (gift_webhook_max_body 64k), exactly at it and past it
{
    my $base = canon();
    my $pad = 65536 - length($base);
    accepted('body of exactly 64k', $base . (' ' x $pad));
    refused('body of 64k + 1', canon() . (' ' x ($pad + 1)), 413, undef);
    my $d = refused('body of 100k', canon(note => str('p' x 100_000)), 413,
        undef);
    like($d->{message}, qr/gift_webhook_max_body/, "the module's 413");
}

# nginx's own limit (client_max_body_size 1m): its 413 through error_page
{
    my ($st, $d, $res) = post(canon(note => str('q' x 2_000_000)));
    is($st, 413, 'body over client_max_body_size: 413');
    is(ref $d && $d->{error}, 'body_too_large', "nginx's 413 as JSON");
    like($d->{message} // '', qr/server accepts/, 'from the error_page');
    like($res->{headers}{'content-type'} // '', qr{^application/json},
        "nginx's 413: JSON answer");

    my $h = "POST /gift HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        . "Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n";
    ($st, $d) = raw_http($h . ('x' x 100_000));
    is($st, 413, 'Content-Length of 5 MB, body cut short: 413');
    is(ref $d && $d->{error}, 'body_too_large', 'JSON 413');
}

# chunked bodies
{
    my $body = canon();
    my ($id) = $body =~ /"eventId":"([^"]+)"/;
    my ($st, $d) = raw_http(chunked_request('/gift', 'application/json',
        substr($body, 0, 7), substr($body, 7, 20), substr($body, 27)));
    is($st, 202, 'chunked body: 202');
    is($d->{id}, $id, 'chunked body: its id');
    $good{$d->{id}} = $d->{seq} if $st == 202;

    $body = canon(note => str('c' x 40_000));
    ($id) = $body =~ /"eventId":"([^"]+)"/;
    ($st, $d) = raw_http(chunked_request('/gift', 'application/json',
        map { substr($body, $_ * 1000, 1000) } 0 .. length($body) / 1000));
    is($st, 202, 'chunked body of 40k in 41 chunks: 202');
    is($d->{id}, $id, 'chunked 40k: its id');
    $good{$d->{id}} = $d->{seq} if $st == 202;

    ($st, $d) = raw_http(chunked_request('/gift', 'application/json',
        '{"event":', '"gift",'));
    is_deeply([$st, ref $d && $d->{error}], [400, 'invalid_json'],
        'chunked truncated JSON: 400 invalid_json');

    ($st, $d) = raw_http(chunked_request('/gift', 'application/json'));
    is_deeply([$st, ref $d && $d->{error}], [400, 'invalid_json'],
        'chunked empty body: 400 invalid_json');

    $body = canon(note => str('d' x 70_000));
    ($st, $d) = raw_http(chunked_request('/gift', 'application/json',
        map { substr($body, $_ * 8192, 8192) } 0 .. length($body) / 8192));
    is($st, 413, 'chunked body over gift_webhook_max_body: 413');
    is(ref $d && $d->{error}, 'body_too_large', 'chunked: body_too_large');
    like(ref $d && $d->{message}, qr/gift_webhook_max_body/,
        "chunked: the module's 413");

    $body = canon(note => str('e' x 1_500_000));
    ($st, $d) = raw_http(chunked_request('/gift', 'application/json',
        map { substr($body, $_ * 65536, 65536) } 0 .. length($body) / 65536));
    is($st, 413, 'chunked body over client_max_body_size: 413');
    is(ref $d && $d->{error}, 'body_too_large', "chunked: nginx's 413 as JSON");
    like(ref $d && $d->{message}, qr/server accepts/, 'chunked: error_page');

    ($st, $d) = raw_http(chunked_request('/gift', 'text/plain', canon()));
    is_deeply([$st, ref $d && $d->{error}], [415, 'unsupported_media_type'],
        'chunked text/plain: 415');
}

# ------------------------------------------------------------ slowloris
# Connections that hold a worker's attention without finishing a request:
# headers dripped a byte at a time (client_header_timeout bounds the whole
# header, however steadily it drips), headers that stop half way, and
# bodies that stop (client_body_timeout, per read).  nginx closes each
# without an answer; meanwhile gifts and other requests are served as
# usual, and nothing of theirs is published.
{
    my $fds = sub { my @f = glob("/proc/$_[0]/fd/*"); scalar @f };
    my @workers = $ngx->workers;
    my %fd0 = map { $_ => $fds->($_) } @workers;
    my $head = "POST /gift HTTP/1.1\r\nHost: localhost\r\n"
        . "Content-Type: application/json\r\nX-Slow: "
        . ('a' x 200) . "\r\n\r\n";
    my $body_head = "POST /gift-slow HTTP/1.1\r\nHost: localhost\r\n"
        . "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n";
    my (@drip, @stall, @body);
    my $open = sub {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $port, Proto => 'tcp', Timeout => 5, Blocking => 0)
            or die "connect: $!";
        return { s => $s, off => 0, got => '', closed => undef };
    };
    local $SIG{PIPE} = 'IGNORE';
    my $t0 = time;
    for (1 .. 50) {
        my $c = $open->();
        push @drip, $c;
        $c = $open->();
        syswrite($c->{s}, substr($head, 0, 40));
        push @stall, $c;
        $c = $open->();
        syswrite($c->{s}, $body_head . '{"event":"gift","eventId":"slow-');
        push @body, $c;
    }
    my $sel = IO::Select->new(map { $_->{s} } @drip, @stall, @body);
    my %by = map { ($_->{s} => $_) } @drip, @stall, @body;
    my ($served, $static) = (0, 0);
    my $end = time + 10;
    while (time < $end && $sel->count) {
        # one more header byte on each dripping connection, every 0.25 s
        for my $c (grep { !defined $_->{closed} } @drip) {
            next if $c->{off} >= length($head) - 4;
            syswrite($c->{s}, substr($head, $c->{off}, 1)) and $c->{off}++;
        }
        # the worker still serves gifts and static requests meanwhile
        if (time - $t0 < 1.5) {
            my ($st, $d) = post(canon());
            if ($st == 202 && ref $d) {
                $served++;
                $good{$d->{id}} = $d->{seq};
            }
            $static++ if HTTP::Tiny->new(timeout => 2)
                ->get($ngx->url('/static'))->{status} == 200;
        }
        for my $s ($sel->can_read(0.25)) {
            my $c = $by{$s};
            my $r = sysread($s, $c->{got}, 4096, length $c->{got});
            next if !defined $r && $!{EAGAIN};
            if (!$r) {
                $c->{closed} = time - $t0;
                $sel->remove($s);
                close $s;
            }
        }
    }
    for my $case ([ 'headers dripped a byte every 0.25 s', \@drip ],
                  [ 'headers stopped half way', \@stall ],
                  [ 'body stopped after 32 of 400 bytes', \@body ])
    {
        my ($what, $conns) = @$case;
        my @open = grep { !defined $_->{closed} } @$conns;
        my @early = grep { defined $_->{closed} && $_->{closed} < 1.5 }
            @$conns;
        my @said = grep { length $_->{got} } @$conns;
        is(scalar @open, 0, "slowloris, $what: nginx closed all 50");
        is(scalar @early, 0, "... none before the 2 s timeout");
        is(scalar @said, 0, '... without an answer (nginx logs it: '
            . '"client timed out")');
        $_->{s} && close $_->{s} for @open;
    }
    cmp_ok($served, '>', 0, "gifts accepted meanwhile ($served)");
    cmp_ok($static, '>', 0, "static requests served meanwhile ($static)");
    like(GiftTest::slurp($ngx->error_log), qr/client timed out/,
        'the error log says "client timed out"');
    ok(GiftTest::wait_until(5, sub {
        !grep { $fds->($_) > $fd0{$_} } @workers
    }), "the workers' open files are back to where they were");
}

# ------------------------------------------------------------ afterwards

my $last = accepted('a final good gift', canon());
my $info = GiftTest::stream_info($nats->url)->{GIFTS};
is($info->{messages}, scalar(keys %good),
    'GIFTS holds exactly the accepted gifts (count)');
is($info->{last_seq}, scalar(keys %good), 'no sequence used by a refusal');
my %stored;
for my $s (1 .. ($info->{last_seq} // 0)) {
    my $m = GiftTest::stored($nats->url, 'GIFTS', $s) or next;
    $stored{$m->{event}{eventId}} = $s;
}
is_deeply(\%stored, \%good, 'GIFTS holds exactly the accepted ids and seqs');

is_deeply([$ngx->bad_log_lines], [], 'no [alert] or [emerg]');
is(scalar(() = GiftTest::slurp($ngx->error_log) =~ /exited on signal/g), 0,
    'no worker crashed');
is($ngx->stop, 0, 'nginx exits cleanly');

done_testing();
