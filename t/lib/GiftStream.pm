package GiftStream;

# Test helpers for the acknowledgement stream, core Perl only:
#   - a minimal NATS client (the text protocol: CONNECT, PUB/HPUB, SUB, MSG)
#     to publish GiftAcks as the dispatcher does (JetStream publish with a
#     Nats-Msg-Id, waiting for the PubAck);
#   - a protobuf encoder for gift.v1.GiftAck (proto3 wire format);
#   - a raw-socket SSE client.

use strict;
use warnings;

use IO::Select;
use IO::Socket::INET;
use JSON::PP ();
use Socket ();
use Time::HiRes qw(time);

my $JSON = JSON::PP->new->canonical;

# ------------------------------------------------------------ protobuf

sub _varint {
    my ($n) = @_;
    my $out = '';
    while ($n >= 0x80) {
        $out .= chr(($n & 0x7f) | 0x80);
        $n >>= 7;
    }
    return $out . chr($n);
}

sub _field_varint {
    my ($num, $v) = @_;
    return '' unless $v;
    return _varint($num << 3) . _varint($v);
}

sub _field_string {
    my ($num, $s) = @_;
    return '' unless defined $s && length $s;
    utf8::encode($s) if utf8::is_utf8($s);
    return _varint(($num << 3) | 2) . _varint(length $s) . $s;
}

my %STATUS = (ok => 1, dead_letter => 2);

# encode_ack({ eventId, deviceId, rounds, status => 'ok', ... })
sub encode_ack {
    my ($a) = @_;
    return join '',
        _field_string(1, $a->{eventId}),
        _field_string(2, $a->{deviceId}),
        _field_varint(3, $a->{rounds}),
        _field_varint(4, $STATUS{$a->{status} // 'ok'}),
        _field_string(5, $a->{reason}),
        _field_varint(6, $a->{attempts} // 1),
        _field_varint(7, $a->{rpcLatencyUs}),
        _field_varint(8, $a->{completedAtMs}),
        _field_string(9, $a->{platform}),
        _field_string(10, $a->{roomId}),
        _field_string(11, $a->{userId}),
        _field_string(12, $a->{userName}),
        _field_string(13, $a->{giftName}),
        _field_varint(14, $a->{diamond}),
        _field_varint(15, $a->{quantity}),
        _field_varint(16, $a->{receivedAtMs}),
        _field_varint(17, $a->{roundsRequested}),
        _field_varint(18, $a->{capped} ? 1 : 0),
        _field_varint(19, $a->{parts});
}

# ------------------------------------------------------------ NATS

# Reads here wait in select() with a deadline; a write to a server that
# stopped reading fails after 20 s instead of blocking the test.
sub _send_timeout {
    my ($s) = @_;
    setsockopt($s, Socket::SOL_SOCKET(), Socket::SO_SNDTIMEO(),
        pack('l!l!', 20, 0));
}

sub nats_connect {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
        Proto => 'tcp', Timeout => 5) or die "nats connect: $!";
    $s->autoflush(1);
    _send_timeout($s);
    my $self = bless { sock => $s, buf => '', sid => 0,
        inbox => '_INBOX.t' . $$ . int(rand(1e9)) }, __PACKAGE__;
    $self->_readline =~ /^INFO/ or die "no INFO from nats-server";
    print $s 'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
        . '"no_responders":true,"lang":"perl","version":"0"}' . "\r\n";
    print $s "SUB $self->{inbox}.* 1\r\nPING\r\n";
    while (1) {
        my $l = $self->_readline;
        last if $l =~ /^PONG/;
        die "nats: $l" if $l =~ /^-ERR/;
    }
    return $self;
}

sub _fill {
    my ($self, $timeout) = @_;
    my $sel = IO::Select->new($self->{sock});
    return 0 unless $sel->can_read($timeout);
    my $n = sysread($self->{sock}, my $chunk, 65536);
    die "nats connection closed" unless $n;
    $self->{buf} .= $chunk;
    return 1;
}

sub _readline {
    my ($self, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while ($self->{buf} !~ /\r\n/) {
        die 'nats-server on port ' . ($self->{sock}->peerport // '?')
            . ': no answer within ' . ($timeout // 5) . " s (wedged?)\n"
            if time > $end;
        $self->_fill(0.5);
    }
    $self->{buf} =~ s/^(.*?)\r\n//s;
    return $1;
}

sub _readn {
    my ($self, $n) = @_;
    while (length $self->{buf} < $n + 2) {
        $self->_fill(1) or die 'nats-server on port '
            . ($self->{sock}->peerport // '?') . ": short read (wedged?)\n";
    }
    my $d = substr($self->{buf}, 0, $n);
    substr($self->{buf}, 0, $n + 2) = '';
    return $d;
}

# The next MSG/HMSG: (subject, headers_text, payload).
sub _next_msg {
    my ($self, $timeout) = @_;
    while (1) {
        my $l = $self->_readline($timeout);
        if ($l =~ /^PING/) {
            print {$self->{sock}} "PONG\r\n";
            next;
        }
        next if $l =~ /^(PONG|\+OK)/;
        die "nats: $l" if $l =~ /^-ERR/;
        my @f = split ' ', $l;
        if ($f[0] eq 'MSG') {
            return ($f[1], '', $self->_readn($f[-1]));
        }
        if ($f[0] eq 'HMSG') {
            my $all = $self->_readn($f[-1]);
            return ($f[1], substr($all, 0, $f[-2]), substr($all, $f[-2]));
        }
    }
}

# JetStream publish with a message id; returns the PubAck as a hash.
sub js_publish {
    my ($self, $subject, $data, $msgid) = @_;
    my $reply = "$self->{inbox}." . (++$self->{sid});
    my $hdr = "NATS/1.0\r\n" . ($msgid ? "Nats-Msg-Id: $msgid\r\n" : '')
        . "\r\n";
    print {$self->{sock}} "HPUB $subject $reply " . length($hdr) . ' '
        . (length($hdr) + length($data)) . "\r\n$hdr$data\r\n";
    my ($subj, $h, $p) = $self->_next_msg(5);
    die "nats: no responders for $subject" if $h =~ /503/;
    return $JSON->decode($p);
}

# Publish many GiftAcks back to back (pipelined), then collect the PubAcks:
# they reach the workers as one burst.  Returns the sequences.
sub publish_acks_burst {
    my ($self, @acks) = @_;
    my $buf = '';
    for my $a (@acks) {
        $a->{status} //= 'ok';
        $a->{completedAtMs} //= int(time * 1000);
        my $data = encode_ack($a);
        my $reply = "$self->{inbox}." . (++$self->{sid});
        my $hdr = "NATS/1.0\r\nNats-Msg-Id: $a->{eventId}:ack\r\n\r\n";
        $buf .= "HPUB gift.acks.$a->{deviceId} $reply " . length($hdr) . ' '
            . (length($hdr) + length($data)) . "\r\n$hdr$data\r\n";
    }
    print {$self->{sock}} $buf;
    my @seqs;
    for (@acks) {
        my ($subj, $h, $p) = $self->_next_msg(10);
        push @seqs, $JSON->decode($p)->{seq};
    }
    return @seqs;
}

# Publish a GiftAck as the dispatcher does.
sub publish_ack {
    my ($self, %a) = @_;
    $a{status} //= 'ok';
    $a{completedAtMs} //= int(time * 1000);
    $a{receivedAtMs} //= $a{completedAtMs} - 3;
    return $self->js_publish("gift.acks.$a{deviceId}", encode_ack(\%a),
        "$a{eventId}:ack");
}

sub close { close $_[0]{sock} }

# ------------------------------------------------------------ HTTP clients

# What the SSE and WebSocket clients share: a connection to nginx on
# loopback, and reading whatever has arrived into $self->{raw}.
package GiftStream::Conn;

use IO::Select;

sub _connect {
    my ($port, $what) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $port, Proto => 'tcp', Timeout => 5)
        or die "$what connect: $!";
    $s->autoflush(1);
    GiftStream::_send_timeout($s);
    return $s;
}

sub _fill {
    my ($self, $timeout) = @_;
    my $sel = IO::Select->new($self->{sock});
    return 0 unless $sel->can_read($timeout);
    my $n = sysread($self->{sock}, my $chunk, 65536);
    if (!$n) {
        $self->{eof} = 1;
        return 0;
    }
    $self->{raw} .= $chunk;
    return 1;
}

# ------------------------------------------------------------ SSE

package GiftStream::SSE;

use parent -norequire, 'GiftStream::Conn';

use IO::Select;
use Time::HiRes qw(time);

# GiftStream::SSE->new(port => P, path => '/gift/events?...', headers => {})
sub new {
    my ($class, %a) = @_;
    my $s = GiftStream::Conn::_connect($a{port}, 'sse');
    my $h = join '', map { "$_: $a{headers}{$_}\r\n" }
        keys %{$a{headers} // {}};
    print $s "GET " . ($a{path} // '/gift/events') . " HTTP/1.1\r\n"
        . "Host: 127.0.0.1\r\nAccept: text/event-stream\r\n$h\r\n";
    my $self = bless { sock => $s, raw => '', body => '', events => [],
        chunked => 0 }, $class;
    $self->_read_head;
    return $self;
}

sub _read_head {
    my ($self) = @_;
    my $end = time + 5;
    while ($self->{raw} !~ /\r\n\r\n/) {
        die 'nginx on port ' . ($self->{sock}->peerport // '?')
            . ': no SSE response header within 5 s' . "\n"
            if time > $end || $self->{eof};
        $self->_fill(0.5);
    }
    $self->{raw} =~ s/^(.*?)\r\n\r\n//s;
    my @lines = split /\r\n/, $1;
    my $status = shift @lines;
    ($self->{status}) = $status =~ /^HTTP\/1\.\d (\d+)/;
    for (@lines) {
        my ($k, $v) = /^([^:]+):\s*(.*)$/ or next;
        $self->{headers}{lc $k} = $v;
    }
    $self->{chunked} = ($self->{headers}{'transfer-encoding'} // '')
        =~ /chunked/i;
}

sub status { $_[0]{status} }
sub header { $_[0]{headers}{lc $_[1]} }
sub eof { $_[0]{eof} }

# Move complete chunks (or raw bytes) from raw into body.
sub _dechunk {
    my ($self) = @_;
    if (!$self->{chunked}) {
        $self->{body} .= $self->{raw};
        $self->{raw} = '';
        return;
    }
    while ($self->{raw} =~ /^([0-9a-fA-F]+)\r\n/) {
        my $len = hex $1;
        my $hl = length($1) + 2;
        last if length($self->{raw}) < $hl + $len + 2;
        $self->{body} .= substr($self->{raw}, $hl, $len);
        substr($self->{raw}, 0, $hl + $len + 2) = '';
        $self->{eof} = 1 if $len == 0;
    }
}

# Parse complete events out of body; comments are counted, not returned.
sub _parse {
    my ($self) = @_;
    my $end = rindex($self->{body}, "\n\n");
    return if $end < 0;
    my $complete = substr($self->{body}, 0, $end);
    substr($self->{body}, 0, $end + 2) = '';
    for my $block (split /\n\n/, $complete) {
        my %ev;
        my $comment = 1;
        for my $line (split /\n/, $block) {
            if ($line =~ /^:/) {
                $self->{comments}++;
                push @{$self->{comment_lines}}, $line;
                next;
            }
            $comment = 0;
            my ($k, $v) = $line =~ /^([^:]+): ?(.*)$/ or next;
            if ($k eq 'data') {
                $ev{data} = defined $ev{data} ? "$ev{data}\n$v" : $v;
            } else {
                $ev{$k} = $v;
            }
        }
        $self->{retry} = $ev{retry} if defined $ev{retry};
        # as EventSource does: a block without data dispatches nothing
        next if $comment || !defined $ev{data};
        $ev{event} //= 'message';
        $ev{json} = eval { $JSON->decode($ev{data}) } if defined $ev{data};
        push @{$self->{events}}, \%ev;
    }
}

# Wait until at least $n events (not comments) have arrived, or timeout;
# returns the events received so far and removes them.
sub take {
    my ($self, $n, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while (@{$self->{events}} < $n && !$self->{eof}) {
        my $left = $end - time;
        last if $left <= 0;
        $self->_fill($left > 0.2 ? 0.2 : $left);
        $self->_dechunk;
        $self->_parse;
    }
    $self->_dechunk;
    $self->_parse;
    return splice(@{$self->{events}}, 0);
}

# Events that have arrived by now, without waiting.
sub poll {
    my ($self) = @_;
    1 while $self->_fill(0);
    $self->_dechunk;
    $self->_parse;
    return splice(@{$self->{events}}, 0);
}

# Read whatever arrives within $timeout seconds.
sub drain {
    my ($self, $timeout) = @_;
    return $self->take(1_000_000_000, $timeout);
}

sub comments { $_[0]{comments} // 0 }
sub retry { $_[0]{retry} }
sub comment_lines { @{$_[0]{comment_lines} // []} }
sub close { close $_[0]{sock} }

# ------------------------------------------------------------ WebSocket

package GiftStream::WS;

use parent -norequire, 'GiftStream::Conn';

use Digest::SHA qw(sha1_base64);
use IO::Select;
use MIME::Base64 qw(encode_base64);
use Time::HiRes qw(time);

# GiftStream::WS->new(port => P, path => '/gift/ws', headers => {...})
# Performs the handshake; ->status is 101 on success.
sub new {
    my ($class, %a) = @_;
    my $s = GiftStream::Conn::_connect($a{port}, 'ws');
    my $key = encode_base64(join('', map { chr(int(rand(256))) } 1 .. 16), '');
    my %h = ('Upgrade' => 'websocket', 'Connection' => 'Upgrade',
        'Sec-WebSocket-Key' => $key, 'Sec-WebSocket-Version' => 13,
        %{$a{headers} // {}});
    delete $h{$_} for grep { !defined $h{$_} } keys %h;
    print $s "GET " . ($a{path} // '/gift/ws') . " HTTP/1.1\r\n"
        . "Host: " . ($a{host} // "127.0.0.1") . "\r\n"
        . join('', map { "$_: $h{$_}\r\n" } sort keys %h) . "\r\n";
    my $self = bless { sock => $s, raw => '', key => $key }, $class;
    my $end = time + 5;
    while ($self->{raw} !~ /\r\n\r\n/) {
        die "nginx on port $a{port}: no WebSocket response within 5 s\n"
            if time > $end;
        $self->_fill(0.5) or ($self->{eof} and die "ws: closed");
    }
    $self->{raw} =~ s/^(.*?)\r\n\r\n//s;
    my @lines = split /\r\n/, $1;
    ($self->{status}) = shift(@lines) =~ /^HTTP\/1\.\d (\d+)/;
    for (@lines) {
        my ($k, $v) = /^([^:]+):\s*(.*)$/ or next;
        $self->{headers}{lc $k} = $v;
    }
    if ($self->{status} != 101 && $self->{headers}{'content-length'}) {
        $self->_fill(1) while length($self->{raw})
            < $self->{headers}{'content-length'} && !$self->{eof};
        $self->{body} = $self->{raw};
    }
    return $self;
}

sub status { $_[0]{status} }
sub header { $_[0]{headers}{lc $_[1]} }
sub body { $_[0]{body} }
sub eof { $_[0]{eof} }

sub expected_accept {
    my ($self) = @_;
    my $a = sha1_base64($self->{key} . '258EAFA5-E914-47DA-95CA-C5AB0DC85B11');
    return $a . '=';
}

# A client frame; masked unless $opt{unmasked}; $opt{rsv}, $opt{fin}.
sub send_frame {
    my ($self, $opcode, $payload, %opt) = @_;
    $payload //= '';
    my $fin = exists $opt{fin} ? $opt{fin} : 1;
    my $b0 = ($fin ? 0x80 : 0) | ($opt{rsv} ? 0x40 : 0) | $opcode;
    my $len = length $payload;
    my $mbit = $opt{unmasked} ? 0 : 0x80;
    my $hdr = chr($b0);
    if ($len < 126) {
        $hdr .= chr($mbit | $len);
    } elsif ($len < 65536) {
        $hdr .= chr($mbit | 126) . pack('n', $len);
    } else {
        $hdr .= chr($mbit | 127) . pack('NN', 0, $len);
    }
    if (!$opt{unmasked}) {
        my $mask = join '', map { chr(int(rand(256))) } 1 .. 4;
        my $m = $payload ^ substr($mask x (int($len / 4) + 1), 0, $len);
        $payload = $m;
        $hdr .= $mask;
    }
    local $SIG{PIPE} = 'IGNORE';
    syswrite($self->{sock}, $hdr . $payload);
}

sub send_text { $_[0]->send_frame(1, $_[1], @_[2 .. $#_]) }

# The next server frame: { op, fin, payload, masked }, or undef on timeout.
sub next_frame {
    my ($self, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while (1) {
        my $r = $self->{raw};
        if (length $r >= 2) {
            my ($b0, $b1) = map { ord } split //, substr($r, 0, 2);
            my $len = $b1 & 0x7f;
            my $h = 2;
            if ($len == 126 && length $r >= 4) {
                $len = unpack('n', substr($r, 2, 2));
                $h = 4;
            } elsif ($len == 127 && length $r >= 10) {
                my ($hi, $lo) = unpack('NN', substr($r, 2, 8));
                $len = $hi * 4294967296 + $lo;
                $h = 10;
            }
            if ($len < 126 || $h > 2) {
                if (length $r >= $h + $len) {
                    substr($self->{raw}, 0, $h + $len) = '';
                    # a browser answers every ping (the server closes a
                    # client that answers none); no_pong => 1 does not
                    $self->send_frame(10, substr($r, $h, $len))
                        if ($b0 & 0x0f) == 9 && !$self->{no_pong};
                    return { op => $b0 & 0x0f, fin => $b0 & 0x80,
                        masked => $b1 & 0x80,
                        payload => substr($r, $h, $len) };
                }
            }
        }
        my $left = $end - time;
        return undef if $left <= 0 || $self->{eof};
        $self->_fill($left > 0.2 ? 0.2 : $left);
    }
}

# The next $n text messages (acknowledgements and notices), decoded;
# pings are counted and skipped.
sub take {
    my ($self, $n, $timeout) = @_;
    my $end = time + ($timeout // 5);
    my @m;
    while (@m < $n) {
        my $left = $end - time;
        last if $left <= 0;
        my $f = $self->next_frame($left) or last;
        if ($f->{op} == 9) {
            $self->{pings}++;
            next;
        }
        if ($f->{op} == 8) {
            $self->{close} = $f;
            last;
        }
        push @m, $JSON->decode($f->{payload}) if $f->{op} == 1;
    }
    return @m;
}

sub pings { $_[0]{pings} // 0 }
sub close_frame { $_[0]{close} }

# Wait until the server has handled everything sent so far: a ping of our
# own, answered by its pong (frames are handled in order).  Server pings
# are counted; a text message meanwhile is a failure (returns false): none
# is expected at such a point.
sub sync {
    my ($self, $timeout) = @_;
    my $p = 'sync-' . ++$self->{syncs};
    $self->send_frame(9, $p);
    my $end = time + ($timeout // 30);
    while (1) {
        my $f = $self->next_frame($end - time) or return 0;
        if ($f->{op} == 9) {
            $self->{pings}++;
            next;
        }
        return 1 if $f->{op} == 10 && $f->{payload} eq $p;
        return 0 unless $f->{op} == 10;
    }
}

# Wait for the server's close frame; returns its status code.
sub wait_close {
    my ($self, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while (time < $end) {
        my $f = $self->next_frame($end - time) or last;
        if ($f->{op} == 8) {
            $self->{close} = $f;
            return unpack('n', $f->{payload});
        }
    }
    return undef;
}

sub close { close $_[0]{sock} }


1;
