package GiftTest;

# A small harness for the integration tests, in the manner of nginx-tests:
# each test starts its own real servers (nats-server, mosquitto, nginx) on
# free loopback ports in a temporary directory, and stops only what it
# started, by PID.  Core Perl only.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Temp ();
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(:sys_wait_h);
use Socket ();
use Time::HiRes qw(sleep time);

our $ROOT = abs_path(dirname(__FILE__) . '/../..');
# GIFT_BUILD: another build tree (make test SANITIZE=1 uses build/asan)
our $BUILD = $ENV{GIFT_BUILD} ? abs_path($ENV{GIFT_BUILD}) : "$ROOT/build";
our $JSON = JSON::PP->new->canonical->allow_nonref;

my %children;      # pid => name, for everything this process started
my $owner = $$;

# Sanitizer reports go to files under $SAN_DIR (ASan and UBSan log_path),
# for everything this test starts that inherits the environment (the
# dispatcher, tbsim, giftctl); nginx gets its own in its directory.  At
# exit, those files, and the logs of what this test started, are scanned:
# a report fails the test, naming the file.
our $SAN_DIR;
my @scan;       # files and globs scanned for sanitizer reports at exit
our $SAN_RE = qr/ERROR:\ AddressSanitizer | LeakSanitizer | ThreadSanitizer
    | UndefinedBehaviorSanitizer | runtime\ error:/x;
if ($ENV{GIFT_SANITIZE}) {
    $SAN_DIR = File::Temp::tempdir('gift-san-XXXXXX', TMPDIR => 1,
        CLEANUP => !$ENV{GIFT_KEEP});
    for my $v (qw(ASAN_OPTIONS UBSAN_OPTIONS)) {
        (my $o = $ENV{$v} // '') =~ s/(^|:)log_path=[^:]*//g;
        my $f = $v eq 'ASAN_OPTIONS' ? 'asan' : 'ubsan';
        $ENV{$v} = join ':', grep { length } $o, "log_path=$SAN_DIR/$f";
    }
    push @scan, "$SAN_DIR/*";
}

# scan_later($file_or_glob): scanned for sanitizer reports when the test ends
sub scan_later { push @scan, @_ }

# Sanitizer report lines in the files registered so far, as
# { file => [lines] }.
sub sanitizer_findings {
    my %found;
    my %seen;
    for my $f (map { /[*?]/ ? glob($_) : $_ } @scan) {
        next if $seen{$f}++ || !-f $f;
        my @l = grep { $_ =~ $SAN_RE } split /\n/, slurp($f);
        $found{$f} = \@l if @l;
    }
    return \%found;
}

# prerequisite($ok, $what): a program or package the test needs.  Under
# `make test` (GIFT_REQUIRE_ALL=1) a missing one is a failure; run by hand
# (prove) the test, or the part that needs it, is skipped.
#   GiftTest::skip_all_unless($ok, $what)      before any test
#   GiftTest::skip_unless($ok, $what, $n)      inside SKIP: { }
sub skip_all_unless {
    my ($ok, $what) = @_;
    return 1 if $ok;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    if ($ENV{GIFT_REQUIRE_ALL}) {
        Test::More::plan(tests => 1);
        Test::More::fail("$what (make test requires it: run 'make deps')");
        exit 1;
    }
    Test::More::plan(skip_all => $what);
}

sub skip_unless {
    my ($ok, $what, $n) = @_;
    return 1 if $ok;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    if ($ENV{GIFT_REQUIRE_ALL}) {
        Test::More::fail("$what (make test requires it: run 'make deps')");
        $n--;
    }
    no warnings 'exiting';
    Test::More::skip($what, $n);
}

END {
    my $st = $?;
    kill_children();
    $? = $st;
    return unless $$ == $owner;
    my $found = sanitizer_findings();
    if (%$found) {
        for my $f (sort keys %$found) {
            my @l = @{$found->{$f}};
            print STDERR "# sanitizer report in $f:\n",
                map { "#   $_\n" } @l[0 .. ($#l > 9 ? 9 : $#l)];
        }
        print STDERR "# FAILED: sanitizer reports in "
            . join(', ', sort keys %$found) . "\n";
        $? = 1 unless $?;
    }
}

sub kill_children {
    local $?;       # waitpid below must not change the test's exit status
    return unless $$ == $owner;
    # nginx masters first, with TERM: a KILLed master leaves its workers
    for my $pid (grep { $children{$_} eq 'nginx' } keys %children) {
        kill 'TERM', $pid;
        my $end = time + 5;
        sleep 0.05 while waitpid($pid, WNOHANG) == 0 && time < $end;
        delete $children{$pid} unless kill(0, $pid);
    }
    # the others with TERM too, so that a sanitizer's exit report (leaks)
    # is written; KILL what is still there after 5 s
    my @rest = keys %children;
    kill 'TERM', @rest;
    my $end = time + 5;
    while (@rest && time < $end) {
        @rest = grep { waitpid($_, WNOHANG) == 0 } @rest;
        sleep 0.05 if @rest;
    }
    for my $pid (@rest) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
    %children = ();
}

sub root { $ROOT }
sub build { $BUILD }

# What an nginx command line needs in front when the module is the
# sanitizer build: the runtime preloaded (as start() does for the server).
sub nginx_env {
    return '' unless $ENV{GIFT_NGINX_PRELOAD};
    return "env LD_PRELOAD='$ENV{GIFT_NGINX_PRELOAD}' "
        . 'ASAN_OPTIONS=detect_leaks=0 ';
}

sub find_bin {
    my ($name) = @_;
    for my $d (split(/:/, $ENV{PATH} // ''), '/usr/sbin', '/usr/bin',
        '/sbin')
    {
        return "$d/$name" if -x "$d/$name";
    }
    die "$name not found; run 'make deps'\n";
}

# A temporary directory, removed at exit unless GIFT_KEEP=1.
sub tempdir {
    return File::Temp::tempdir('gift-t-XXXXXX', TMPDIR => 1,
        CLEANUP => !$ENV{GIFT_KEEP});
}

# A free TCP port on 127.0.0.1, below the kernel's ephemeral range
# (32768 and up), so an outgoing connection cannot take it meanwhile.
my %given;
sub free_port {
    for (1 .. 500) {
        my $port = 20000 + int(rand(12000));
        next if $given{$port};
        my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
            LocalPort => $port, Proto => 'tcp', ReuseAddr => 1, Listen => 1)
            or next;
        close $s;
        $given{$port} = 1;
        return $port;
    }
    die "no free port\n";
}

# io_timeout($sock, $secs): no read or write on $sock blocks longer than
# $secs (SO_RCVTIMEO, SO_SNDTIMEO): a blocking readline or read on a wedged
# server returns (undef, EAGAIN) instead of hanging the test.
sub io_timeout {
    my ($sock, $secs) = @_;
    my $tv = pack('l!l!', int($secs), int(($secs - int($secs)) * 1e6));
    setsockopt($sock, Socket::SOL_SOCKET(), Socket::SO_RCVTIMEO(), $tv)
        or die "SO_RCVTIMEO: $!";
    setsockopt($sock, Socket::SOL_SOCKET(), Socket::SO_SNDTIMEO(), $tv)
        or die "SO_SNDTIMEO: $!";
    return $sock;
}

sub port_open {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
        Proto => 'tcp', Timeout => 1);
    return 0 unless $s;
    close $s;
    return 1;
}

# wait_until($seconds, sub { ... }): poll until the sub returns true.
sub wait_until {
    my ($timeout, $cond, $step) = @_;
    my $end = time + $timeout;
    while (time < $end) {
        my $v = $cond->();
        return $v if $v;
        sleep($step // 0.05);
    }
    return $cond->();
}

# spawn($name, $log, @argv): start a child with stdout and stderr in $log.
sub spawn {
    my ($name, $log, @argv) = @_;
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>>', $log) or die "$log: $!";
        open(STDERR, '>&', \*STDOUT);
        exec(@argv) or die "exec $argv[0]: $!";
    }
    $children{$pid} = $name;
    scan_later($log);
    return $pid;
}

# Stop a child we started: signal, then wait up to $timeout seconds;
# returns its exit status ($?), or undef if it had to be killed.
sub stop_pid {
    my ($pid, $sig, $timeout) = @_;
    return 0 unless $pid && $children{$pid};
    kill($sig // 'TERM', $pid);
    my $end = time + ($timeout // 10);
    while (time < $end) {
        my $r = waitpid($pid, WNOHANG);
        if ($r == $pid) {
            delete $children{$pid};
            return $?;
        }
        sleep 0.02;
    }
    kill 'KILL', $pid;
    waitpid($pid, 0);
    delete $children{$pid};
    return undef;
}

sub alive {
    my ($pid) = @_;
    return 0 unless $pid && $children{$pid};
    return waitpid($pid, WNOHANG) == 0;
}

sub slurp {
    my ($f) = @_;
    open(my $fh, '<', $f) or return '';
    local $/;
    my $s = <$fh>;
    return $s;
}

sub spurt {
    my ($f, $s) = @_;
    open(my $fh, '>', $f) or die "$f: $!";
    print $fh $s;
    close $fh;
}

# ------------------------------------------------------------------ NATS

package GiftTest::Nats;

sub new {
    my ($class, %a) = @_;
    my $self = bless {
        dir  => $a{dir} // GiftTest::tempdir(),
        port => $a{port} // GiftTest::free_port(),
        args => $a{args} // [],
        conf => $a{conf},       # a config file: used instead of the flags
    }, $class;
    GiftTest::make_path("$self->{dir}/nats");
    return $self;
}

sub url { 'nats://127.0.0.1:' . $_[0]{port} }
sub port { $_[0]{port} }
sub pid { $_[0]{pid} }
sub log { $_[0]{dir} . '/nats.log' }

sub start {
    my ($self) = @_;
    my @argv = $self->{conf} ? ('-c', $self->{conf})
        : ('-js', '-a', '127.0.0.1', '-p', $self->{port}, '-sd',
           "$self->{dir}/nats", @{$self->{args}});
    $self->{pid} = GiftTest::spawn('nats-server', $self->log,
        GiftTest::find_bin('nats-server'), @argv);
    my $ok = GiftTest::wait_until(10, sub {
        GiftTest::slurp($self->log) =~ /Server is ready/
            && GiftTest::port_open($self->{port});
    });
    die "nats-server did not start:\n" . GiftTest::slurp($self->log)
        unless $ok;
    # Each start appends; remember where this one began.
    return $self;
}

sub stop {
    my ($self) = @_;
    my $st = GiftTest::stop_pid($self->{pid}, 'TERM', 10);
    $self->{pid} = undef;
    return $st;
}

sub kill9 {
    my ($self) = @_;
    GiftTest::stop_pid($self->{pid}, 'KILL', 5);
    $self->{pid} = undef;
}

sub restart {
    my ($self) = @_;
    $self->stop if $self->{pid};
    # a new line to tell the new start's "ready" from the old one's
    open(my $fh, '>', $self->log);
    close $fh;
    return $self->start;
}

package GiftTest;

sub start_nats {
    my (%a) = @_;
    return GiftTest::Nats->new(%a)->start;
}

# giftctl's credential and TLS options (--creds FILE, --tls-ca FILE, ...)
# for every call below, when a test's NATS needs them.
our @GIFTCTL_OPTS;

# Run giftctl against a NATS URL; returns stdout (and dies on failure
# unless allow_fail).  In list context: (stdout, exit status).
sub giftctl {
    my ($url, @args) = @_;
    my $cmd = join(' ', map { "'$_'" } "$BUILD/giftctl", @GIFTCTL_OPTS,
        '-s', $url, @args);
    my $out = `timeout -k 5 120 $cmd 2>&1`;
    Test::More::diag("giftctl @args: no answer within 120 s from $url "
        . '(a wedged nats-server?)') if $? >> 8 == 124;
    return wantarray ? ($out, $? >> 8) : $out;
}

# giftctl get STREAM SEQ, decoded; undef when there is no such message.
sub stored {
    my ($url, $stream, $seq) = @_;
    my $o = join(' ', map { "'$_'" } @GIFTCTL_OPTS);
    my $out = `timeout -k 5 120 '$BUILD/giftctl' $o -s '$url' get '$stream' '$seq' 2>/dev/null`;
    die "giftctl get $stream $seq: no answer within 120 s from $url\n"
        if $? >> 8 == 124;
    return undef if $? != 0 || $out !~ /^\{/;
    return $JSON->decode($out);
}

# giftctl get STREAM FIRST-LAST, decoded: a list of messages.
sub stored_range {
    my ($url, $stream, $first, $last) = @_;
    my $o = join(' ', map { "'$_'" } @GIFTCTL_OPTS);
    my $out = `timeout -k 5 120 '$BUILD/giftctl' $o -s '$url' get '$stream' '$first-$last' 2>/dev/null`;
    die "giftctl get $stream $first-$last: no answer within 120 s from $url\n"
        if $? >> 8 == 124;
    return map { $JSON->decode($_) } grep { /^\{/ } split /\n/, $out;
}

# giftctl info as { GIFTS => { messages => N, last_seq => N }, ..., lag => N }
sub stream_info {
    my ($url) = @_;
    my %info;
    for (split /\n/, scalar giftctl($url, 'info')) {
        if (/^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$/) {
            $info{$1} = { messages => $2, bytes => $3, first_seq => $4,
                last_seq => $5 };
        }
        $info{lag} = $1 if /lag (\d+)/;
        $info{ack_pending} = $1 if /ack pending (\d+)/;
    }
    return \%info;
}

# ------------------------------------------------------------------ nginx

package GiftTest::Nginx;

sub new {
    my ($class, %a) = @_;
    my $self = bless { %a }, $class;
    $self->{dir} //= GiftTest::tempdir();
    # workers run as nobody when the tests run as root: they must reach
    # client_body_temp_path inside this directory
    chmod 0711, $self->{dir};
    $self->{port} //= GiftTest::free_port();
    $self->{workers} //= 2;
    GiftTest::make_path("$self->{dir}/tmp", "$self->{dir}/logs");
    return $self;
}

sub port { $_[0]{port} }
sub pid { $_[0]{pid} }
sub dir { $_[0]{dir} }
sub url { 'http://127.0.0.1:' . $_[0]{port} . ($_[1] // '') }
sub error_log { $_[0]{dir} . '/error.log' }

sub write_conf {
    my ($self) = @_;
    my $d = $self->{dir};
    my $module = $self->{module} // "$GiftTest::BUILD/ngx_http_gift_module.so";
    my $nats = $self->{nats_url} ? "gift_nats_url $self->{nats_url};" : '';
    my $conf = $self->{conf} // <<"EOF";
load_module $module;
worker_processes $self->{workers};
error_log $d/error.log $self->{log_level};
pid $d/nginx.pid;
daemon off;
$self->{main}
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    keepalive_requests 100000;
    $nats
    $self->{http}
    server {
        listen 127.0.0.1:$self->{port} $self->{listen};
        location = /gift {
            gift_webhook;
            $self->{webhook}
        }
        location = /static {
            return 200 "static\\n";
        }
        $self->{server}
    }
}
EOF
    GiftTest::spurt("$d/nginx.conf", $conf);
}

sub start {
    my ($self) = @_;
    $self->{log_level} //= 'info';
    $_ //= '' for @$self{qw(main http server webhook listen)};
    # GIFT_CORE_DIR=/some/dir: workers leave core files there
    $self->{main} .= " worker_rlimit_core 1g; working_directory $ENV{GIFT_CORE_DIR};"
        if $ENV{GIFT_CORE_DIR};
    $self->write_conf;
    my $d = $self->{dir};
    # a sanitizer build of the module: Debian's nginx with the runtime
    # preloaded; nginx keeps its pools until exit by design: no leak check
    my @pre = $ENV{GIFT_NGINX_PRELOAD}
        ? ('env', "LD_PRELOAD=$ENV{GIFT_NGINX_PRELOAD}",
           'ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:'
           . "log_path=$d/asan",
           "UBSAN_OPTIONS=print_stacktrace=1:log_path=$d/ubsan") : ();
    GiftTest::scan_later($self->error_log, "$d/asan.*", "$d/ubsan.*");
    $self->{pid} = GiftTest::spawn('nginx', "$d/stderr.log", @pre,
        GiftTest::find_bin('nginx'), '-p', "$d/", '-c', "$d/nginx.conf",
        '-e', "$d/error.log");
    my $ok = GiftTest::wait_until(10, sub {
        GiftTest::port_open($self->{port})
    });
    die "nginx did not start:\n" . GiftTest::slurp("$d/error.log")
        . GiftTest::slurp("$d/stderr.log") unless $ok;
    return $self;
}

# The worker PIDs the master has now (from /proc).
sub workers {
    my ($self) = @_;
    my @w;
    for my $p (glob '/proc/[0-9]*/stat') {
        my $s = GiftTest::slurp($p) or next;
        my ($pid, $ppid) = $s =~ /^(\d+) \(.*?\) \S (\d+)/ or next;
        push @w, $pid if $ppid == $self->{pid}
            && GiftTest::slurp("/proc/$pid/cmdline") =~ /worker process/;
    }
    return sort { $a <=> $b } @w;
}

# Reload: SIGHUP, then wait until the workers are all new ones.
sub reload {
    my ($self) = @_;
    my %old = map { $_ => 1 } $self->workers;
    $self->write_conf;
    kill 'HUP', $self->{pid};
    GiftTest::wait_until(10, sub {
        my @w = $self->workers;
        @w >= $self->{workers} && !grep { $old{$_} } @w;
    }) or die "reload did not replace the workers";
}

sub stop {
    my ($self, $sig) = @_;
    my $st = GiftTest::stop_pid($self->{pid}, $sig // 'QUIT', 15);
    $self->{pid} = undef;
    return $st;
}

# [alert] and [emerg] lines in the error log, and sanitizer reports
# (empty list: healthy).
sub bad_log_lines {
    my ($self) = @_;
    my @bad = grep { /\[(alert|emerg)\]/ }
        split /\n/, GiftTest::slurp($self->error_log);
    for my $f (glob "$self->{dir}/asan.* $self->{dir}/ubsan.*") {
        push @bad, grep { /ERROR: |runtime error:/ }
            split /\n/, GiftTest::slurp($f);
    }
    return @bad;
}

package GiftTest;

sub start_nginx {
    my (%a) = @_;
    return GiftTest::Nginx->new(%a)->start;
}

# ------------------------------------------------------------------ HTTP

# A new connection per request: HTTP::Tiny writes headers and body
# separately, and on a kept-alive connection Nagle's algorithm and the
# peer's delayed ACK would add tens of milliseconds to each request.
my $http = HTTP::Tiny->new(timeout => 10, keep_alive => 0);

# post_gift($port_or_url, $body, %headers) -> ($status, $decoded_or_raw, $res)
sub post_gift {
    my ($where, $body, %h) = @_;
    my $url = $where =~ /^\d+$/ ? "http://127.0.0.1:$where/gift" : $where;
    $body = $JSON->encode($body) if ref $body;
    $h{'Content-Type'} //= 'application/json';
    my $res = $http->request('POST', $url, { content => $body,
        headers => \%h });
    my $data = $res->{content};
    my $dec = eval { $JSON->decode($data) };
    return ($res->{status}, $dec // $data, $res);
}

my $seq = 0;
# A canonical gift with a unique event id; fields may be overridden.
sub gift {
    my (%over) = @_;
    $seq++;
    my %g = (
        event => 'gift', platform => 'tiktok', userId => "user_$seq",
        userName => "User $seq", giftName => 'Motor', diamond => 10,
        quantity => 1, timestamp => int(time * 1000),
        eventId => "t$$-" . int(time * 1000) . "-$seq",
    );
    @g{keys %over} = values %over;
    delete $g{$_} for grep { !defined $g{$_} } keys %g;
    return \%g;
}

# Post @gifts over $conns concurrent keep-alive connections (one child
# process each).  Returns a list of [eventId, status, body] in input order.
sub post_many {
    my ($port, $conns, @gifts) = @_;
    my $dir = tempdir();
    my @pids;
    for my $c (0 .. $conns - 1) {
        my $pid = fork();
        die "fork: $!" unless defined $pid;
        if ($pid == 0) {
            my $h = HTTP::Tiny->new(timeout => 15, keep_alive => 1);
            open(my $out, '>', "$dir/$c") or POSIX::_exit(1);
            for (my $i = $c; $i < @gifts; $i += $conns) {
                my $res = $h->request('POST',
                    "http://127.0.0.1:$port/gift", {
                        content => $JSON->encode($gifts[$i]),
                        headers => { 'Content-Type' => 'application/json' },
                    });
                (my $b = $res->{content} // '') =~ s/\n//g;
                print $out "$i\t$res->{status}\t$b\n";
            }
            close $out;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    waitpid($_, 0) for @pids;
    my @r;
    for my $c (0 .. $conns - 1) {
        for (split /\n/, slurp("$dir/$c")) {
            my ($i, $st, $b) = split /\t/, $_, 3;
            $r[$i] = [$gifts[$i]{eventId}, $st, $b];
        }
    }
    return @r;
}

1;
