# A headless Chromium driven by t/browser/driver.mjs (the same driver and
# the same code as t/40-overlay.t): one JSON command a line, one answer.
#
#   my $b = GiftBrowser->start($node, "$ROOT/t/browser/driver.mjs");
#   $b->cmd(goto => url => ...); $b->cmd(eval => expr => '...'); $b->close;

package GiftBrowser;

use strict;
use warnings;
use IO::Select;
use IPC::Open2 ();
use JSON::PP;
use POSIX qw(:sys_wait_h);
use Time::HiRes ();
use GiftTest;

my $JSON = JSON::PP->new->canonical->utf8;

# Processes whose command line names a Chromium profile.
sub browser_pids {
    my ($profile) = @_;
    my @p;
    for my $f (glob '/proc/[0-9]*/cmdline') {
        my $c = GiftTest::slurp($f);
        push @p, $f =~ m{/proc/(\d+)/} if index($c, $profile) >= 0;
    }
    return @p;
}

my @drivers;

END {
    local $?;
    for my $b (@drivers) {
        next unless $b->{pid};
        # SIGTERM: the driver closes Chromium, then exits
        kill 'TERM', $b->{pid};
        my $end = Time::HiRes::time() + 10;
        while (Time::HiRes::time() < $end
            && waitpid($b->{pid}, WNOHANG) == 0)
        {
            Time::HiRes::sleep(0.05);
        }
        if (kill 0, $b->{pid}) {
            kill 'KILL', $b->{pid};
            waitpid($b->{pid}, 0);
        }
        # the last resort for a browser whose driver was killed
        kill 'KILL', $_ for GiftBrowser::browser_pids($b->{profile});
    }
}

sub start {
    my ($class, $node, $script) = @_;
    my $dir = GiftTest::tempdir();
    my $self = bless { profile => "$dir/chromium-profile", buf => '',
        id => 0 }, $class;
    mkdir $self->{profile};
    $self->{pid} = IPC::Open2::open2($self->{out}, $self->{in}, $node, $script,
        '--user-data-dir', $self->{profile}, '--timeout-s', 70);
    push @drivers, $self;
    my $hello = $self->_answer(0, 40);
    $self->{version} = $hello->{version};
    return $self;
}

sub cmd {
    my ($self, $cmd, %a) = @_;
    my $id = ++$self->{id};
    my $timeout = delete $a{timeout} // 20;
    print { $self->{in} } $JSON->encode({ id => $id, cmd => $cmd, %a }),
        "\n";
    return $self->_answer($id, $timeout);
}

sub view { $_[0]->cmd('view') }

sub _answer {
    my ($self, $id, $timeout) = @_;
    my $end = Time::HiRes::time() + $timeout;
    my $sel = IO::Select->new($self->{out});
    while (1) {
        while ($self->{buf} =~ s/^(.*?)\n//) {
            my $m = eval { $JSON->decode($1) } or next;
            next unless defined $m->{id} && $m->{id} == $id;
            die "driver: $m->{error}\n" unless $m->{ok};
            return $m->{value};
        }
        my $left = $end - Time::HiRes::time();
        die "driver: no answer to #$id within ${timeout}s\n" if $left <= 0;
        next unless $sel->can_read($left > 0.5 ? 0.5 : $left);
        my $got = sysread($self->{out}, my $chunk, 65536);
        die "driver exited\n" unless $got;
        $self->{buf} .= $chunk;
    }
}

# Ask the driver to close the browser; returns its exit status.
sub close {
    my ($self) = @_;
    eval { $self->cmd('close', timeout => 15) };
    close $self->{in};
    my $end = Time::HiRes::time() + 10;
    my $st;
    while (Time::HiRes::time() < $end) {
        if (waitpid($self->{pid}, WNOHANG) == $self->{pid}) {
            $st = $? >> 8;
            last;
        }
        Time::HiRes::sleep(0.05);
    }
    $self->{pid} = undef if defined $st;
    return $st;
}

1;
