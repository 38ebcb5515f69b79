package GiftFaults;

# Helpers for the fault tests (t/1*.t): background posters that record
# every answer, a small raw NATS client to read a whole stream quickly, and
# /proc readings of a process (RSS, open fds, threads).  Core Perl only.
#
# Everything here stops only what it started, by PID.

use strict;
use warnings;

use HTTP::Tiny;
use IO::Select;
use IO::Socket::INET;
use MIME::Base64 qw(decode_base64);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(sleep time);

use GiftTest;

my $JSON = $GiftTest::JSON;
my %posters;    # pid => 1, poster children still running
my $owner = $$;

END {
    local $?;
    return unless $$ == $owner;
    for my $pid (keys %posters) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
    stop_our_nginx();
}

# GiftTest's END sends SIGKILL to what is left, and a SIGKILLed nginx master
# leaves its workers running (orphans holding a port and a NATS connection).
# When a test dies early, stop our nginx masters with SIGTERM first and wait
# until they have taken their workers down (they stay zombies for GiftTest's
# END to reap, so no PID can be reused meanwhile).
sub stop_our_nginx {
    my @masters;
    for my $p (glob '/proc/[0-9]*/stat') {
        my $s = GiftTest::slurp($p) or next;
        my ($pid, $state, $ppid) = $s =~ /^(\d+) \(.*?\) (\S) (\d+)/ or next;
        next unless $ppid == $$ && $state ne 'Z';
        push @masters, $pid
            if GiftTest::slurp("/proc/$pid/cmdline") =~ /^nginx: master/;
    }
    return unless @masters;
    kill 'TERM', @masters;
    GiftTest::wait_until(10, sub {
        !grep { GiftTest::slurp("/proc/$_/stat") !~ /^\d+ \(.*?\) Z/ } @masters
    }, 0.05);
}

# ------------------------------------------------------------------ /proc

# Resident set size of a process, in kB (undef if it is gone).
sub rss_kb {
    my ($pid) = @_;
    my ($kb) = GiftTest::slurp("/proc/$pid/status") =~ /^VmRSS:\s+(\d+)/m;
    return $kb;
}

# Open file descriptors of a process (undef if it is gone).
sub fd_count {
    my ($pid) = @_;
    opendir(my $d, "/proc/$pid/fd") or return undef;
    my $n = grep { /^\d+$/ } readdir $d;
    closedir $d;
    return $n;
}

# Bytes received but not yet read by the application, over all the TCP
# sockets listening on or accepted from 127.0.0.1:$port (/proc/net/tcp).
sub unread_bytes {
    my ($port) = @_;
    my $hex = sprintf('%04X', $port);
    my $n = 0;
    for (split /\n/, GiftTest::slurp('/proc/net/tcp')) {
        my @f = split ' ';
        next unless @f > 4 && $f[1] =~ /:$hex$/;
        my (undef, $rx) = split /:/, $f[4];
        $n += hex $rx;
    }
    return $n;
}

# The fd count once it has stopped moving (connections that clients just
# closed take a moment to be closed by nginx too).
sub settled_fds {
    my ($pid, $timeout) = @_;
    my @seen;
    GiftTest::wait_until($timeout // 5, sub {
        push @seen, fd_count($pid) // -1;
        @seen >= 3 && $seen[-1] == $seen[-2] && $seen[-2] == $seen[-3];
    }, 0.1);
    return $seen[-1];
}

sub thread_count {
    my ($pid) = @_;
    my ($n) = GiftTest::slurp("/proc/$pid/status") =~ /^Threads:\s+(\d+)/m;
    return $n;
}

# SIGSTOP a process and wait until each of its threads is stopped (the
# signal takes effect asynchronously: a busy thread can still run a bit).
sub freeze {
    my ($pid) = @_;
    kill 'STOP', $pid;
    return GiftTest::wait_until(5, sub {
        my @t = glob "/proc/$pid/task/*/stat";
        @t && !grep { GiftTest::slurp($_) !~ /^\d+ \(.*?\) [tT] / } @t;
    }, 0.01);
}

sub pid_alive {
    my ($pid) = @_;
    return -e "/proc/$pid"
        && GiftTest::slurp("/proc/$pid/stat") !~ /^\d+ \(.*?\) Z/;
}

# ------------------------------------------------------------------ logs

# Wait until every PID in @$pids has logged a line matching $re (after
# byte offset $from of the file).
sub wait_log_each {
    my ($file, $pids, $re, $timeout, $from) = @_;
    return GiftTest::wait_until($timeout, sub {
        my $log = substr(GiftTest::slurp($file), $from // 0);
        for my $pid (@$pids) {
            return 0 unless grep { /\] $pid#\d+: / && $_ =~ $re }
                split /\n/, $log;
        }
        return 1;
    });
}

# ------------------------------------------------------------------ HTTP

# A minimal keep-alive HTTP/1.1 client that writes each request in one
# write() on a TCP_NODELAY socket.  HTTP::Tiny writes a POST's headers and
# body separately, so Nagle's algorithm and the peer's delayed ACK add
# about 40 ms to each POST on loopback: fine for correctness tests, not for
# timing or for keeping many requests in flight.
package GiftFaults::Http;

use Socket qw(IPPROTO_TCP TCP_NODELAY);

sub new {
    my ($class, $port, $timeout) = @_;
    return bless { port => $port, timeout => $timeout // 10 }, $class;
}

sub _connect {
    my ($self) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $self->{port}, Proto => 'tcp', Timeout => 5)
        or return undef;
    setsockopt($s, IPPROTO_TCP, TCP_NODELAY, 1);
    GiftTest::io_timeout($s, 20);       # reads use select; this bounds writes
    binmode $s;
    $self->{s} = $s;
    $self->{buf} = '';
    return $s;
}

# request($method, $path, $body, \%headers) ->
#   { status, headers => {lowercase => value}, content }
# status 599 with content = the error when the connection failed.
sub request {
    my ($self, $method, $path, $body, $hdr) = @_;
    my $s = $self->{s} // $self->_connect
        // return { status => 599, content => "connect: $!" };
    my $req = "$method $path HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    $req .= "$_: $hdr->{$_}\r\n" for sort keys %{$hdr || {}};
    $req .= 'Content-Length: ' . length($body) . "\r\n" if defined $body;
    $req .= "\r\n" . ($body // '');
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite($s, $req, length($req) - $off, $off);
        return $self->_fail("write: $!") unless defined $n;
        $off += $n;
    }
    my $sel = IO::Select->new($s);
    my $end = time + $self->{timeout};
    my ($head, %h, $len);
    while (1) {
        if (!defined $head) {
            my $i = index($self->{buf}, "\r\n\r\n");
            if ($i >= 0) {
                $head = substr($self->{buf}, 0, $i);
                substr($self->{buf}, 0, $i + 4) = '';
                for (split /\r\n/, $head) {
                    $h{lc $1} = $2 if /^([^:]+):\s*(.*)$/;
                }
                $len = $h{'content-length'} // 0;
            }
        }
        if (defined $head && length($self->{buf}) >= $len) {
            my $content = substr($self->{buf}, 0, $len);
            substr($self->{buf}, 0, $len) = '';
            my ($st) = $head =~ m{^HTTP/1\.\d (\d+)};
            $self->disconnect if ($h{connection} // '') =~ /close/i;
            return { status => $st, headers => \%h, content => $content };
        }
        my $left = $end - time;
        return $self->_fail('timeout') if $left <= 0 || !$sel->can_read($left);
        my $n = sysread($s, $self->{buf}, 65536, length $self->{buf});
        return $self->_fail(defined $n ? 'connection closed by the server'
            : "read: $!") unless $n;
    }
}

sub _fail {
    my ($self, $err) = @_;
    $self->disconnect;
    return { status => 599, content => $err };
}

sub disconnect {
    my ($self) = @_;
    CORE::close($self->{s}) if $self->{s};
    $self->{s} = undef;
}

sub post_json {
    my ($self, $path, $body) = @_;
    return $self->request('POST', $path, $body,
        { 'Content-Type' => 'application/json' });
}

package GiftFaults;

# ------------------------------------------------------------------ nginx

# GiftTest::start_nginx returns once the port is open, which the master
# does before it forks its workers.  This waits until all the workers are
# there and each has logged its connection to NATS; returns the worker PIDs.
sub workers_ready {
    my ($ngx, $timeout, $from) = @_;
    my @w;
    GiftTest::wait_until($timeout // 10, sub {
        @w = $ngx->workers;
        @w == $ngx->{workers};
    }) or return ();
    wait_log_each($ngx->error_log, \@w, qr/connected to NATS/,
        $timeout // 10, $from) or return ();
    return @w;
}

# ------------------------------------------------------------------ posters

# Start $conns children, each posting unique canonical gifts over one
# keep-alive connection until stopped (or $max gifts, or $deadline seconds).
# Each answer is recorded; nothing is retried here (the tests retry later,
# as a sender would).
#
#   my $p = GiftFaults::start_posters(port => $port, conns => 6,
#       pace => 0.005, prefix => 'r');
#   ...; my @rec = $p->stop;
#   # [{ id, conn, status, t0, t1, body, raw, gift, retry_after }]
sub start_posters {
    my (%a) = @_;
    my $self = bless {
        dir    => GiftTest::tempdir(),
        conns  => $a{conns} // 4,
        pace   => $a{pace} // 0,
        max    => $a{max} // 100000,
        prefix => ($a{prefix} // 'p') . "$$-" . int(time * 1000),
        port   => $a{port},
        path   => $a{path} // '/gift',
        deadline => $a{deadline} // 50,
    }, 'GiftFaults::Posters';
    my $dir = $self->{dir};
    for my $c (0 .. $self->{conns} - 1) {
        my $pid = fork();
        die "fork: $!" unless defined $pid;
        if ($pid == 0) {
            my $end = time + $self->{deadline};
            my $h = GiftFaults::Http->new($self->{port});
            open(my $out, '>', "$dir/$c") or POSIX::_exit(1);
            select((select($out), $| = 1)[0]);
            for (my $i = 0; $i < $self->{max} && time < $end; $i++) {
                last if -e "$dir/stop";
                my $id = "$self->{prefix}-$c-$i";
                my $body = $JSON->encode(GiftTest::gift(eventId => $id,
                    userId => "poster_$c"));
                my $t0 = time;
                my $res = $h->post_json($self->{path}, $body);
                my $t1 = time;
                (my $b = $res->{content} // '') =~ s/[\t\r\n]+/ /g;
                printf $out "%s\t%d\t%.6f\t%.6f\t%s\t%s\t%s\n", $id,
                    $res->{status}, $t0, $t1, $body, $b,
                    $res->{headers}{'retry-after'} // '-';
                sleep($self->{pace}) if $self->{pace};
            }
            close $out;
            POSIX::_exit(0);
        }
        $posters{$pid} = 1;
        push @{$self->{pids}}, $pid;
    }
    return $self;
}

package GiftFaults::Posters;

# Records so far (the children keep going).
sub records {
    my ($self) = @_;
    my @r;
    for my $c (0 .. $self->{conns} - 1) {
        for (split /\n/, GiftTest::slurp("$self->{dir}/$c")) {
            my ($id, $st, $t0, $t1, $req, $b, $ra) = split /\t/, $_, 7;
            next unless defined $ra;        # a line still being written
            my $dec = eval { $JSON->decode($b) };
            push @r, { id => $id, conn => $c, status => $st, t0 => $t0,
                t1 => $t1, gift => $req, body => $dec // $b, raw => $b,
                retry_after => $ra eq '-' ? undef : $ra };
        }
    }
    return sort { $a->{t0} <=> $b->{t0} } @r;
}

sub count { scalar(my @r = $_[0]->records) }

# True once every connection has finished a request it began after $t
# (so whatever it had in flight at $t has ended).
sub each_began_after {
    my ($self, $t) = @_;
    my %done = map { $_->{conn} => 1 } grep { $_->{t0} > $t } $self->records;
    return keys(%done) == $self->{conns};
}

sub stop {
    my ($self) = @_;
    GiftTest::spurt("$self->{dir}/stop", '');
    for my $pid (@{$self->{pids}}) {
        waitpid($pid, 0);
        delete $posters{$pid};
    }
    return $self->records;
}

package GiftFaults;

# Post raw JSON bodies (strings) over $conns keep-alive connections, each
# until it gets a 202 or $tries attempts; returns { body => [status, ...] }
# with the final answer last.  For retrying what failed during a fault.
sub retry_until_accepted {
    my ($port, $conns, $tries, @bodies) = @_;
    my $dir = GiftTest::tempdir();
    my @pids;
    for my $c (0 .. $conns - 1) {
        my $pid = fork();
        die "fork: $!" unless defined $pid;
        if ($pid == 0) {
            my $h = GiftFaults::Http->new($port);
            open(my $out, '>', "$dir/$c") or POSIX::_exit(1);
            for (my $i = $c; $i < @bodies; $i += $conns) {
                for my $try (1 .. $tries) {
                    my $res = $h->post_json('/gift', $bodies[$i]);
                    (my $b = $res->{content} // '') =~ s/[\t\r\n]+/ /g;
                    print $out "$i\t$res->{status}\t$b\n";
                    last if $res->{status} == 202;
                    sleep 0.2;
                }
            }
            close $out;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    waitpid($_, 0) for @pids;
    my %r;
    for my $c (0 .. $conns - 1) {
        for (split /\n/, GiftTest::slurp("$dir/$c")) {
            my ($i, $st, $b) = split /\t/, $_, 3;
            push @{$r{$bodies[$i]}}, [$st, eval { $JSON->decode($b) } // $b];
        }
    }
    return \%r;
}


sub percentile {
    my ($p, @v) = @_;
    return undef unless @v;
    @v = sort { $a <=> $b } @v;
    my $i = int($p / 100 * $#v + 0.5);
    return $v[$i];
}

# ------------------------------------------------------------------ NATS

# A raw NATS protocol client, just enough for JetStream API requests; used
# to read thousands of stored messages in one connection (giftctl get is one
# process per message).  The tests still cross-check a sample with giftctl.
package GiftFaults::NatsClient;

sub new {
    my ($class, $url) = @_;
    my ($host, $port) = $url =~ m{^nats://([^:/]+):(\d+)} or die "bad url $url";
    my $s = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port,
        Proto => 'tcp', Timeout => 5) or die "connect $url: $!";
    GiftTest::io_timeout($s, 20);       # reads use select; this bounds writes
    binmode $s;
    my $self = bless { s => $s, buf => '', inbox => "_GF.$$." . int(rand(1e9)),
        sel => IO::Select->new($s) }, $class;
    my $info = $self->_line(5);
    die "no INFO from $url" unless $info && $info =~ /^INFO /;
    $self->_send('CONNECT {"verbose":false,"pedantic":false,"headers":true,'
        . '"no_responders":true,"protocol":1,"name":"gift-tests"}' . "\r\n"
        . "SUB $self->{inbox}.* 1\r\nPING\r\n");
    while (defined(my $l = $self->_line(5))) {
        last if $l eq 'PONG';
        die "NATS: $l" if $l =~ /^-ERR/;
    }
    return $self;
}

sub _send {
    my ($self, $data) = @_;
    my $off = 0;
    while ($off < length $data) {
        my $n = syswrite($self->{s}, $data, length($data) - $off, $off);
        die "write: $!" unless defined $n;
        $off += $n;
    }
}

sub _fill {
    my ($self, $timeout) = @_;
    return 0 unless $self->{sel}->can_read($timeout);
    my $n = sysread($self->{s}, $self->{buf}, 65536, length $self->{buf});
    return $n ? 1 : 0;
}

sub _line {
    my ($self, $timeout) = @_;
    my $end = time + $timeout;
    while (1) {
        my $i = index($self->{buf}, "\r\n");
        if ($i >= 0) {
            my $l = substr($self->{buf}, 0, $i);
            substr($self->{buf}, 0, $i + 2) = '';
            return $l;
        }
        my $left = $end - time;
        return undef if $left <= 0 || !$self->_fill($left);
    }
}

sub _bytes {
    my ($self, $n, $timeout) = @_;
    my $end = time + $timeout;
    while (length($self->{buf}) < $n + 2) {
        my $left = $end - time;
        return undef if $left <= 0 || !$self->_fill($left);
    }
    my $b = substr($self->{buf}, 0, $n);
    substr($self->{buf}, 0, $n + 2) = '';
    return $b;
}

# Requests [subject, payload] ...; returns the replies' payloads in order
# (undef for one that did not come within $timeout).  Pipelined in batches.
sub request_many {
    my ($self, $timeout, @reqs) = @_;
    my @out;
    my $batch = 512;
    for (my $start = 0; $start < @reqs; $start += $batch) {
        my $end = $start + $batch - 1;
        $end = $#reqs if $end > $#reqs;
        my $data = '';
        for my $i ($start .. $end) {
            my ($subj, $payload) = @{$reqs[$i]};
            $data .= "PUB $subj $self->{inbox}.$i " . length($payload)
                . "\r\n$payload\r\n";
        }
        $self->_send($data);
        my $want = $end - $start + 1;
        while ($want > 0) {
            my $l = $self->_line($timeout);
            last unless defined $l;
            if ($l eq 'PING') { $self->_send("PONG\r\n"); next; }
            next if $l eq 'PONG' || $l eq '+OK';
            die "NATS: $l" if $l =~ /^-ERR/;
            my @f = split / /, $l;
            if ($f[0] eq 'MSG') {
                my $b = $self->_bytes($f[-1], $timeout);
                my ($i) = $f[1] =~ /\.(\d+)$/;
                $out[$i] = $b if defined $i && !defined $out[$i];
                $want--;
            } elsif ($f[0] eq 'HMSG') {
                # a status-only reply (no responders): headers, no data
                my $b = $self->_bytes($f[-1], $timeout);
                my ($i) = $f[1] =~ /\.(\d+)$/;
                $out[$i] = '' if defined $i && !defined $out[$i];
                $want--;
            }
        }
    }
    return @out;
}

sub request {
    my ($self, $subj, $payload, $timeout) = @_;
    my ($r) = $self->request_many($timeout // 5, [$subj, $payload // '']);
    return defined $r && length $r ? $JSON->decode($r) : undef;
}

sub disconnect { CORE::close($_[0]{s}) }

package GiftFaults;

# JetStream stream info (config and state), decoded; undef on failure.
sub js_stream_info {
    my ($url, $stream) = @_;
    my $c = GiftFaults::NatsClient->new($url);
    my $r = $c->request("\$JS.API.STREAM.INFO.$stream", '');
    $c->disconnect;
    return $r;
}

# Every stored message of $stream as { seq => { id => Nats-Msg-Id,
# subject => ... } }, read with $JS.API.STREAM.MSG.GET over one connection.
sub stream_ids {
    my ($url, $stream) = @_;
    my $info = js_stream_info($url, $stream) or die "no stream $stream";
    my ($first, $last) = @{$info->{state}}{qw(first_seq last_seq)};
    my %m;
    return \%m if !$last || $last < $first;
    my $c = GiftFaults::NatsClient->new($url);
    my @seqs = ($first .. $last);
    my @rep = $c->request_many(10, map {
        ["\$JS.API.STREAM.MSG.GET.$stream", qq({"seq":$_})] } @seqs);
    $c->disconnect;
    for my $k (0 .. $#seqs) {
        my $r = eval { $JSON->decode($rep[$k] // '') } or next;
        my $msg = $r->{message} or next;
        my $h = decode_base64($msg->{hdrs} // '');
        my ($id) = $h =~ /^Nats-Msg-Id:\s*(\S+)\r?$/mi;
        $m{$msg->{seq}} = { id => $id, subject => $msg->{subject} };
    }
    return \%m;
}

# Check what a sender would: every 202 seq holds its own gift (by event id),
# duplicates point at the original; returns a list of problems (empty: OK).
#   $accepted: [ [event id, seq, duplicate], ... ]
sub check_accepted_stored {
    my ($url, $accepted, $stored) = @_;
    $stored //= stream_ids($url, 'GIFTS');
    my @bad;
    for my $a (@$accepted) {
        my ($id, $seq, $dup) = @$a;
        my $m = $stored->{$seq};
        if (!$m) {
            push @bad, "$id: 202 seq $seq is not in GIFTS";
        } elsif (($m->{id} // '') ne $id) {
            push @bad, "$id: 202 seq $seq holds " . ($m->{id} // '?');
        }
    }
    return @bad;
}

# A few 202s cross-checked with the user's tool (giftctl get): the decoded
# event at that seq carries the same event id.  Returns problems.
sub check_with_giftctl {
    my ($url, $n, @accepted) = @_;
    my @bad;
    my @pick = @accepted;
    # spread the sample over the run: first, last and evenly in between
    if (@pick > $n) {
        my $step = @pick / $n;
        @pick = map { $accepted[int($_ * $step)] } 0 .. $n - 1;
        push @pick, $accepted[-1];
    }
    for my $a (@pick) {
        my ($id, $seq) = @$a;
        my $m = GiftTest::stored($url, 'GIFTS', $seq);
        push @bad, "giftctl get GIFTS $seq: "
            . ($m ? "event $m->{event}{eventId}, expected $id" : 'missing')
            unless $m && $m->{event}{eventId} eq $id;
    }
    return @bad;
}

# nats-server monitoring: /connz as decoded JSON (needs -m PORT).
sub connz {
    my ($mport) = @_;
    my $res = HTTP::Tiny->new(timeout => 5)
        ->get("http://127.0.0.1:$mport/connz");
    return $res->{success} ? $JSON->decode($res->{content}) : undef;
}

# Connections named like our nginx workers ("nginx-gift worker PID").
sub worker_conns {
    my ($mport) = @_;
    my $c = connz($mport) or return undef;
    return [ sort map {
        ($_->{name} // '') =~ /nginx-gift worker (\d+)/ ? $1 : () }
        @{$c->{connections} || []} ];
}

1;
