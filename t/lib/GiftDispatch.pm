package GiftDispatch;

# Helpers for the dispatcher's integration tests, on top of GiftTest (core
# Perl only): mosquitto, tbsim and gift-dispatcher as real processes on
# free loopback ports, tbsim's totals, and a tiny NATS client that stores
# GiftEvents in JetStream directly (protobuf written by hand), for loads
# where going through nginx would only slow the test down.

use strict;
use warnings;

use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP ();
use Time::HiRes qw(sleep time);
use GiftTest;

my $JSON = JSON::PP->new->canonical;

# Where gift-dispatcher and tbsim come from: build/, or GIFT_BIN_DIR (the
# sanitizer build, for instance).
sub bin { ($ENV{GIFT_BIN_DIR} // $GiftTest::BUILD) . "/$_[0]" }

# Sanitizer reports (ASan, LSan, UBSan) in a log: the empty list if none.
sub sanitizer_reports {
    my ($text) = @_;
    return grep { /(?:Address|Leak|Thread|Undefined)Sanitizer|runtime error:/ }
        split /\n/, $text;
}

# ------------------------------------------------------------------ mosquitto

package GiftDispatch::Mosquitto;

sub port { $_[0]{port} }
sub pid { $_[0]{pid} }
sub log { "$_[0]{dir}/mosquitto.log" }

sub start {
    my ($self) = @_;
    GiftTest::spurt("$self->{dir}/mosquitto.conf", <<"EOF");
listener $self->{port} 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
EOF
    $self->{pid} = GiftTest::spawn('mosquitto', $self->log,
        GiftTest::find_bin('mosquitto'), '-c', "$self->{dir}/mosquitto.conf");
    GiftTest::wait_until(10, sub { GiftTest::port_open($self->{port}) })
        or die "mosquitto did not start:\n" . GiftTest::slurp($self->log);
    return $self;
}

sub stop {
    my ($self) = @_;
    my $st = GiftTest::stop_pid($self->{pid}, 'TERM', 10);
    $self->{pid} = undef;
    return $st;
}

sub restart {
    my ($self) = @_;
    $self->stop if $self->{pid};
    return $self->start;
}

package GiftDispatch;

sub start_mosquitto {
    my (%a) = @_;
    my $self = bless {
        dir => $a{dir} // GiftTest::tempdir(),
        port => $a{port} // GiftTest::free_port(),
    }, 'GiftDispatch::Mosquitto';
    return $self->start;
}

# ------------------------------------------------------------------ tbsim

package GiftDispatch::Tbsim;

sub pid { $_[0]{pid} }
sub out { "$_[0]{dir}/tbsim-$_[0]{id}.json" }
sub log { "$_[0]{dir}/tbsim-$_[0]{id}.log" }
sub log_text { GiftTest::slurp($_[0]->log) }

sub _read {
    my ($self) = @_;
    my $s = GiftTest::slurp($self->out);
    return undef unless $s =~ /^\{/;
    return eval { $JSON->decode($s) };
}

# The motors' totals now: SIGUSR1, then wait for a newer snapshot.
# { devices => { name => { rounds, rpcs, events, duplicates, errors,
#   ignored } }, totals => {...}, snapshot => N }
sub totals {
    my ($self) = @_;
    my $before = $self->_read;
    my $n = $before ? $before->{snapshot} : 0;
    kill 'USR1', $self->{pid};
    my $t;
    GiftTest::wait_until(10, sub {
        $t = $self->_read;
        $t && $t->{snapshot} > $n;
    }) or die "tbsim wrote no totals\n" . GiftTest::slurp($self->log);
    return $t;
}

# Rounds per device, as { motor_01 => N, ... }.
sub rounds {
    my ($self) = @_;
    my $t = $self->totals;
    return { map { $_ => $t->{devices}{$_}{rounds} } keys %{$t->{devices}} };
}

# Change devices at run time: write the control file, then SIGUSR2
# (lines "offline D1,D2", "online D1,D2", "latency A[-B]", "error-rate P").
sub control {
    my ($self, @lines) = @_;
    GiftTest::spurt("$self->{dir}/tbsim-$self->{id}.control",
        join('', map { "$_\n" } @lines));
    my $n = () = $self->log_text =~ /device \S+ is (?:on|off)line|latency \d|error rate/g;
    kill 'USR2', $self->{pid};
    GiftTest::wait_until(5, sub {
        my $m = () = $self->log_text =~ /device \S+ is (?:on|off)line|latency \d|error rate/g;
        $m > $n;
    }, 0.02);
}

# Stop; returns the final totals written at exit.
sub stop {
    my ($self) = @_;
    return undef unless $self->{pid};
    GiftTest::stop_pid($self->{pid}, 'TERM', 10);
    $self->{pid} = undef;
    return $self->_read;
}

package GiftDispatch;

my $tbsim_seq = 0;

# start_tbsim(dir => ..., mqtt_port => ..., args => [ '--latency-ms', ... ])
sub start_tbsim {
    my (%a) = @_;
    my $self = bless {
        dir => $a{dir} // GiftTest::tempdir(),
        id => ++$tbsim_seq,
    }, 'GiftDispatch::Tbsim';
    unlink $self->out;
    $self->{pid} = GiftTest::spawn('tbsim', $self->log,
        GiftDispatch::bin('tbsim'), '--host', '127.0.0.1', '--port',
        $a{mqtt_port}, '--out', $self->out, '--seed', $a{seed} // 1,
        '--control', "$self->{dir}/tbsim-$self->{id}.control",
        @{$a{args} // []});
    GiftTest::wait_until(10, sub {
        GiftTest::slurp($self->log) =~ /serving/
    }) or die "tbsim did not connect:\n" . GiftTest::slurp($self->log);
    return $self;
}

# ------------------------------------------------------------------ dispatcher

package GiftDispatch::Dispatcher;

sub pid { $_[0]{pid} }
sub conf { $_[0]{conf} }
sub metrics_port { $_[0]{metrics_port} }
sub metrics_url { "http://127.0.0.1:$_[0]{metrics_port}/metrics" }
sub log { "$_[0]{dir}/dispatcher-$_[0]{id}.log" }
sub log_text { GiftTest::slurp($_[0]->log) }

sub start {
    my ($self) = @_;
    $self->{pid} = GiftTest::spawn('gift-dispatcher', $self->log,
        GiftDispatch::bin('gift-dispatcher'), '-c', $self->{conf},
        @{$self->{args}});
    GiftTest::wait_until(15, sub {
        my $l = $self->log_text;
        $l =~ /MQTT: listening/ && $l =~ /running:/
            or !GiftTest::alive($self->{pid});
    });
    die "gift-dispatcher did not start:\n" . $self->log_text
        unless GiftTest::alive($self->{pid});
    return $self;
}

# Stop with a signal (TERM); returns the exit status ($?) or undef when it
# had to be killed after $timeout seconds.
sub stop {
    my ($self, $sig, $timeout) = @_;
    my $st = GiftTest::stop_pid($self->{pid}, $sig // 'TERM', $timeout // 20);
    $self->{pid} = undef;
    return $st;
}

sub signal {
    my ($self, $sig) = @_;
    kill $sig, $self->{pid};
}

# `gift-dispatcher -c CONF ctl ARGS`: (output, exit status).
sub ctl {
    my ($self, @args) = @_;
    my $cmd = join ' ', map { "'$_'" } GiftDispatch::bin('gift-dispatcher'),
        '-c', $self->{conf}, 'ctl', @args;
    my $out = `$cmd 2>&1`;
    return ($out, $? >> 8);
}

# `ctl pause DEVICE`, and its effect in the log: two checks ('ctl pause
# DEVICE', then `what`, by default '... paused').
sub pause_ok {
    my ($self, $dev, $what) = @_;
    my ($out, $rc) = $self->ctl('pause', $dev);
    Test::More::is($rc, 0, "ctl pause $dev") or Test::More::diag($out);
    return Test::More::ok(GiftTest::wait_until(10, sub {
        $self->log_text =~ /device \Q$dev\E: paused/ }, 0.05),
        $what // '... paused');
}

# GET /metrics: (status, body).
sub metrics {
    my ($self) = @_;
    my $r = HTTP::Tiny->new(timeout => 5)->get($self->metrics_url);
    return ($r->{status}, $r->{content});
}

# One sample of /metrics: metric('name{labels}') or metric('name').
sub metric {
    my ($self, $name) = @_;
    my ($st, $text) = $self->metrics;
    return undef unless $st == 200;
    for (split /\n/, $text) {
        return $1 if /^\Q$name\E (\S+)$/;
    }
    return undef;
}

package GiftDispatch;

my $disp_seq = 0;

# The configuration the tests start from: rules of the example (Motor ->
# motor_03, ...) plus what %a says.  rules => "..." replaces the rules
# group's body; extra_nats, extra_mqtt, extra_devices append settings.
sub dispatcher_conf {
    my (%a) = @_;
    my $rules = $a{rules} // <<'EOF';
    default_device = "motor_01";
    rule = (
        { gift = "Rose";  device = "motor_02"; },
        { gift = "Motor"; device = "motor_03"; },
        { gift = "Lion";  device = "motor_04"; multiplier = 3; }
    );
EOF
    # the tests' motors are simulated: unlimited unless a test sets limits
    # (the shipped defaults are finite; t/28-t/29 test them)
    my $devlim = '';
    $devlim .= 'rounds_per_minute = "unlimited"; '
        unless ($a{extra_devices} // "") =~ /rounds_per_minute/;
    $devlim .= 'coalesce_max_rounds = 9007199254740991L; '
        unless ($a{extra_devices} // "") =~ /coalesce_max_rounds/;
    # ... and a silent device fails at once (t/28 tests the grace)
    $devlim .= 'offline_grace_ms = 0; '
        unless ($a{extra_devices} // "") =~ /offline_grace_ms/;
    $rules = "    max_rounds = 9007199254740991L;\n$rules"
        unless $rules =~ /max_rounds/;
    return <<"EOF";
# written by t/lib/GiftDispatch.pm
log_level = "$a{log_level}";
nats = {
    url = "$a{nats_url}";
    fetch_wait_ms = 300;
    shutdown_timeout_ms = $a{shutdown_timeout_ms};
    $a{extra_nats}
};
mqtt = {
    host = "127.0.0.1";
    port = $a{mqtt_port};
    rpc_timeout_ms = $a{rpc_timeout_ms};
    reconnect_min_ms = 50;
    reconnect_max_ms = 500;
    $a{extra_mqtt}
};
devices = {
    $devlim
    $a{extra_devices}
};
metrics = {
    listen = "127.0.0.1:$a{metrics_port}";
};
rules = {
$rules
};
EOF
}

# start_dispatcher(dir => ..., nats_url => ..., mqtt_port => ..., and the
# dispatcher_conf() keys; conf_text => "..." to give the whole file)
sub start_dispatcher {
    my (%a) = @_;
    $a{dir} //= GiftTest::tempdir();
    $a{log_level} //= 'info';
    $a{shutdown_timeout_ms} //= 10000;
    $a{rpc_timeout_ms} //= 3000;
    $a{$_} //= '' for qw(extra_nats extra_mqtt extra_devices);
    $a{metrics_port} //= GiftTest::free_port();
    my $self = bless {
        dir => $a{dir}, id => ++$disp_seq, args => $a{args} // [],
        metrics_port => $a{metrics_port},
    }, 'GiftDispatch::Dispatcher';
    $self->{conf} = "$a{dir}/dispatcher-$self->{id}.conf";
    GiftTest::spurt($self->{conf}, $a{conf_text} // dispatcher_conf(%a));
    return $self->start;
}

# ------------------------------------------------------------------ NATS

# A GiftEvent in protobuf (proto/gift.proto), from a canonical-shaped hash
# (eventId, platform, roomId, userId, userName, giftId, giftName, diamond,
# quantity, timestamp, and for streak frames streakId, streakCount,
# streakEnd).
sub _varint {
    my ($v) = @_;
    my $s = '';
    while ($v >= 0x80) {
        $s .= chr(($v & 0x7f) | 0x80);
        $v = int($v / 128);
    }
    return $s . chr($v);
}

sub _pb_str {
    my ($f, $v) = @_;
    return '' unless defined $v && length $v;
    utf8::encode($v) if utf8::is_utf8($v);
    return _varint(($f << 3) | 2) . _varint(length $v) . $v;
}

sub _pb_int {
    my ($f, $v) = @_;
    return '' unless $v;
    return _varint($f << 3) . _varint($v);
}

sub gift_event_pb {
    my ($g) = @_;
    return _pb_str(1, $g->{eventId}) . _pb_str(2, $g->{platform} // 'tiktok')
        . _pb_str(3, $g->{roomId}) . _pb_str(4, $g->{userId})
        . _pb_str(5, $g->{userName}) . _pb_str(6, $g->{giftId})
        . _pb_str(7, $g->{giftName}) . _pb_int(8, $g->{diamond})
        . _pb_int(9, $g->{quantity}) . _pb_int(10, $g->{timestamp})
        . _pb_int(11, int(time * 1000)) . _pb_str(12, $g->{streakId})
        . _pb_int(13, $g->{streakCount}) . _pb_int(14, $g->{streakEnd} ? 1 : 0);
}

# Store @gifts in GIFTS the way nginx does (subject gift.events.<platform>,
# Nats-Msg-Id = event id), pipelined, and wait for every PubAck.  $raw
# (optional, in a gift as {raw => BYTES}) stores those bytes instead.
# Returns the number of PubAcks without an error.
sub js_publish_gifts {
    my ($url, @gifts) = @_;
    my ($port) = $url =~ /:(\d+)$/;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
        Proto => 'tcp', Timeout => 5) or die "NATS: $!";
    binmode $s;
    GiftTest::io_timeout($s, 20);
    my $info = <$s>;
    die "NATS on port $port: no INFO within 20 s (wedged?)\n"
        unless $info && $info =~ /^INFO/;
    my $inbox = "_INBOX.t$$." . int(rand(1e9));
    my $out = 'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
        . '"no_responders":true,"protocol":1,"name":"gift-test"}' . "\r\n"
        . "SUB $inbox.* 1\r\n";
    my $i = 0;
    for my $g (@gifts) {
        $i++;
        my $pb = exists $g->{raw} ? $g->{raw} : gift_event_pb($g);
        my $hdr = "NATS/1.0\r\nNats-Msg-Id: "
            . ($g->{eventId} // "raw-$$-$i") . "\r\n\r\n";
        my $subj = 'gift.events.' . ($g->{platform} // 'tiktok');
        $out .= "HPUB $subj $inbox.$i " . length($hdr) . ' '
            . (length($hdr) + length($pb)) . "\r\n$hdr$pb\r\n";
    }
    $out .= "PING\r\n";
    print $s $out;

    my ($ok, $got) = (0, 0);
    my $end = time + 30;
    my $buf = '';
    while ($got < @gifts && time < $end) {
        my $line = <$s>;
        die "NATS on port $port: $got of " . scalar(@gifts) . ' PubAcks, '
            . "then nothing for 20 s (wedged?)\n"
            if !defined $line && $!{EAGAIN};
        last unless defined $line;
        if ($line =~ /^PING/) {
            print $s "PONG\r\n";
        } elsif ($line =~ /^H?MSG\s/) {
            # MSG subject sid [reply] len | HMSG ... hdrlen totlen
            my $len = (split ' ', $line)[-1];
            read($s, $buf, $len + 2);
            $got++;
            $ok++ if $buf =~ /"seq"\s*:\s*\d+/ && $buf !~ /"error"/;
        }
    }
    close $s;
    Test::More::diag("NATS on port $port: $got of " . scalar(@gifts)
        . ' PubAcks within 30 s') if $got < @gifts;
    return $ok;
}

# A batch of gifts spread over devices by rule: each is a canonical hash.
my $gseq = 0;
sub gift {
    my (%over) = @_;
    $gseq++;
    my %g = (platform => 'tiktok', userId => "u$gseq", userName => "User $gseq",
        giftName => 'Motor', diamond => 1, quantity => 1,
        timestamp => int(time * 1000),
        eventId => "d$$-" . int(time * 1000) . "-$gseq");
    @g{keys %over} = values %over;
    return \%g;
}

# ------------------------------------------------------------------ reading streams

# A minimal synchronous NATS client: enough for JetStream API requests.
package GiftDispatch::NatsClient;

sub new {
    my ($class, $url) = @_;
    my ($port) = $url =~ /:(\d+)$/;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
        Proto => 'tcp', Timeout => 5) or die "NATS: $!";
    binmode $s;
    GiftTest::io_timeout($s, 20);
    my $info = <$s>;
    die "NATS on port $port: no INFO within 20 s (wedged?)\n"
        unless $info && $info =~ /^INFO/;
    my $inbox = "_INBOX.r$$." . int(rand(1e9));
    print $s 'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
        . '"no_responders":true,"protocol":1}' . "\r\nSUB $inbox.* 1\r\n";
    return bless { s => $s, inbox => $inbox, n => 0, port => $port }, $class;
}

# Send requests (subject, payload pairs) pipelined; returns the replies'
# payloads in order (undef for a reply that did not come within 20 s).
sub requests {
    my ($self, @req) = @_;
    my $s = $self->{s};
    my (%want, @out);
    my $out = '';
    for (my $i = 0; $i < @req; $i += 2) {
        my $id = ++$self->{n};
        $want{$id} = $i / 2;
        $out .= "PUB $req[$i] $self->{inbox}.$id " . length($req[$i + 1])
            . "\r\n$req[$i + 1]\r\n";
    }
    print $s $out;
    my $end = Time::HiRes::time() + 20;
    my $left = keys %want;
    while ($left > 0 && Time::HiRes::time() < $end) {
        my $line = <$s>;
        die "NATS on port $self->{port}: $left JetStream API replies missing, "
            . "nothing for 20 s (wedged?)\n" if !defined $line && $!{EAGAIN};
        last unless defined $line;
        if ($line =~ /^PING/) {
            print $s "PONG\r\n";
        } elsif ($line =~ /^H?MSG\s/) {
            my @f = split ' ', $line;
            my $buf;
            read($s, $buf, $f[-1] + 2);
            my ($id) = $f[1] =~ /\.(\d+)$/;
            next unless defined $id && exists $want{$id};
            substr($buf, -2) = '';
            if ($line =~ /^HMSG/) {               # a status (503 etc.)
                $buf = substr($buf, $f[-2]);
            }
            $out[$want{$id}] = $buf;
            delete $want{$id};
            $left--;
        }
    }
    return @out;
}

sub close { close $_[0]{s} }

package GiftDispatch;

use MIME::Base64 ();

# Protobuf, decoded generically: { field number => value } (the last value
# of a repeated field wins; bytes stay bytes).
sub _pb_decode {
    my ($b) = @_;
    my (%f, $p);
    $p = 0;
    my $varint = sub {
        my ($v, $shift) = (0, 0);
        while ($p < length $b) {
            my $c = ord(substr($b, $p++, 1));
            $v += ($c & 0x7f) * (2 ** $shift);
            $shift += 7;
            return $v unless $c & 0x80;
        }
        return $v;
    };
    while ($p < length $b) {
        my $key = $varint->();
        my ($num, $type) = (int($key / 8), $key % 8);
        if ($type == 0) {
            $f{$num} = $varint->();
        } elsif ($type == 2) {
            my $len = $varint->();
            $f{$num} = substr($b, $p, $len);
            $p += $len;
        } elsif ($type == 1) {
            $p += 8;
        } elsif ($type == 5) {
            $p += 4;
        } else {
            last;
        }
    }
    return \%f;
}

my @ACK_FIELDS = (undef, qw(event_id device_id rounds status reason attempts
    rpc_latency_us completed_at_ms platform room_id user_id user_name
    gift_name diamond quantity received_at_ms rounds_requested capped parts));
my @EVENT_FIELDS = (undef, qw(event_id platform room_id user_id user_name
    gift_id gift_name diamond quantity occurred_at_ms received_at_ms
    streak_id streak_count streak_end));
my %STATUS = (0 => 'unspecified', 1 => 'ok', 2 => 'dead_letter');

sub _named {
    my ($f, $names) = @_;
    my %h;
    for my $i (1 .. $#$names) {
        $h{$names->[$i]} = $f->{$i} // (
            $names->[$i] =~ /^(rounds|status|attempts|rpc_latency_us|
                completed_at_ms|diamond|quantity|received_at_ms|
                occurred_at_ms|streak_count|streak_end)$/x ? 0 : '');
    }
    return \%h;
}

# Every message of a stream: a list of { seq, subject, headers => {..},
# data => bytes }, through the JetStream API (direct get by sequence).
sub stream_messages {
    my ($url, $stream) = @_;
    my $c = GiftDispatch::NatsClient->new($url);
    my ($info) = $c->requests("\$JS.API.STREAM.INFO.$stream", '');
    my $si = eval { $JSON->decode($info // '') } or return ();
    my ($first, $last) = @{$si->{state} // {}}{qw(first_seq last_seq)};
    return () unless $last;
    my @req = map { ("\$JS.API.STREAM.MSG.GET.$stream", qq({"seq":$_})) }
        $first .. $last;
    my @msgs;
    for my $r ($c->requests(@req)) {
        my $m = eval { $JSON->decode($r // '') } or next;
        $m = $m->{message} or next;
        my %h;
        my $hdrs = MIME::Base64::decode_base64($m->{hdrs} // '');
        for (split /\r\n/, $hdrs) {
            $h{$1} = $2 if /^([^:]+):\s*(.*)$/;
        }
        push @msgs, { seq => $m->{seq}, subject => $m->{subject},
            headers => \%h,
            data => MIME::Base64::decode_base64($m->{data} // '') };
    }
    $c->close;
    return @msgs;
}

# GIFT_ACKS decoded: a list of { seq, subject, msg_id, ack => { event_id,
# device_id, rounds, status ("ok"/"dead_letter"), reason, attempts, ... } }.
sub acks {
    my ($url) = @_;
    return map {
        my $a = _named(_pb_decode($_->{data}), \@ACK_FIELDS);
        $a->{status} = $STATUS{$a->{status}} // $a->{status};
        { seq => $_->{seq}, subject => $_->{subject},
          msg_id => $_->{headers}{'Nats-Msg-Id'}, ack => $a };
    } stream_messages($url, 'GIFT_ACKS');
}

# GIFTS_DLQ decoded: { seq, subject, reason, deliveries, event => {...} }.
sub dead_letters {
    my ($url) = @_;
    return map {
        { seq => $_->{seq}, subject => $_->{subject},
          reason => $_->{headers}{'Gift-Dlq-Reason'},
          deliveries => $_->{headers}{'Gift-Deliveries'},
          event => _named(_pb_decode($_->{data}), \@EVENT_FIELDS) };
    } stream_messages($url, 'GIFTS_DLQ');
}

# The consumer's state: { num_pending, num_ack_pending, num_redelivered }.
sub consumer_state {
    my ($url) = @_;
    my $c = GiftDispatch::NatsClient->new($url);
    my ($r) = $c->requests('$JS.API.CONSUMER.INFO.GIFTS.dispatcher', '');
    $c->close;
    return eval { $JSON->decode($r // '') } // {};
}

1;
