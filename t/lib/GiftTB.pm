package GiftTB;
# The ThingsBoard stand-in for the Perl tests: gift-tbstandin (the MQTT
# endpoint, ThingsBoard's transport and the Gift RPC router rule chain) and
# gift-motors (the motors, one session each), as real processes on a free
# loopback port.  The motors object answers like GiftDispatch's tbsim object
# (totals, rounds, control, stop), so a test can use either.
#
#   my $tb = GiftTB::start_tb(dir => $dir, motors => 8, dispatchers => 4,
#                             args => [ '--rpc-timeout-ms', 1000 ]);
#   my $m = GiftTB::start_motors(dir => $dir, port => $tb->port,
#                                motors => 8, args => [ '--silent', 'motor_08' ]);
#   dispatcher: mqtt_port => $tb->port, extra_mqtt => $tb->mqtt_conf(1)

use strict;
use warnings;
use GiftTest;
use GiftDispatch;

my $JSON = $GiftTest::JSON;
my $DIR = GiftTest::root() . '/tools/tbstandin';

# Under make test (GIFT_REQUIRE_ALL) a missing stand-in is an error, never
# a quiet fallback to tbsim.
sub available {
    my $node = eval { GiftTest::find_bin('node') };
    return $node if $node && -d "$DIR/node_modules/aedes";
    die "the ThingsBoard stand-in needs node and tools/tbstandin/node_modules"
        . " (make test requires it: run 'make deps')\n" if $ENV{GIFT_REQUIRE_ALL};
    return undef;
}

# ------------------------------------------------------------ common
package GiftTB::Proc;

sub pid { $_[0]{pid} }
sub out { "$_[0]{dir}/$_[0]{name}-$_[0]{id}.json" }
sub log { "$_[0]{dir}/$_[0]{name}-$_[0]{id}.log" }
sub log_text { GiftTest::slurp($_[0]->log) }
sub ctl_file { "$_[0]{dir}/$_[0]{name}-$_[0]{id}.control" }

sub _read {
    my ($self) = @_;
    my $s = GiftTest::slurp($self->out);
    return undef unless $s =~ /^\{/;
    return eval { $JSON->decode($s) };
}

# The counters now: SIGUSR1, then wait for a newer snapshot.
sub totals {
    my ($self) = @_;
    my $before = $self->_read;
    my $n = $before ? $before->{snapshot} : 0;
    kill 'USR1', $self->{pid};
    my $t;
    GiftTest::wait_until(10, sub {
        $t = $self->_read;
        $t && $t->{snapshot} > $n;
    }) or die "$self->{name} wrote no totals\n" . $self->log_text;
    return $t;
}

sub stop {
    my ($self) = @_;
    return undef unless $self->{pid};
    GiftTest::stop_pid($self->{pid}, 'TERM', 10);
    $self->{pid} = undef;
    return $self->_read;
}

my $seq = 0;
sub _spawn {
    my ($class, $name, $ready, %a) = @_;
    my $self = bless { dir => $a{dir} // GiftTest::tempdir(), id => ++$seq,
        name => $name }, $class;
    unlink $self->out;
    @$self{qw(ready argv)} = ($ready, $a{argv});
    return $self->start;
}

# (Re)start the process with the arguments it was first given (the same
# port for the endpoint): waits for its next "ready" line in the log.
sub start {
    my ($self) = @_;
    return $self if $self->{pid};
    my $node = GiftTB::available() or die "node or tools/tbstandin/node_modules missing\n";
    my $n = () = $self->log_text =~ /$self->{ready}/g;
    $self->{pid} = GiftTest::spawn($self->{name}, $self->log, $node,
        "$DIR/" . ($self->{name} eq 'tb' ? 'tb.mjs' : 'motors.mjs'),
        '--out', $self->out, @{$self->{argv}});
    GiftTest::wait_until(20, sub {
        my $m = () = $self->log_text =~ /$self->{ready}/g;
        $m > $n;
    }) or die "$self->{name} did not start:\n" . $self->log_text;
    return $self;
}

# kill -9: no goodbye to its clients, no counters written.
sub kill9 {
    my ($self) = @_;
    return unless $self->{pid};
    GiftTest::stop_pid($self->{pid}, 'KILL', 10);
    $self->{pid} = undef;
}

# ------------------------------------------------------------ the endpoint
package GiftTB::Endpoint;
our @ISA = ('GiftTB::Proc');

sub port { $_[0]{port} }

# The dispatcher's mqtt settings for dispatcher device N.
sub mqtt_conf {
    my ($self, $n) = @_;
    return qq{access_token = "gift-dispatcher-$n";};
}

package GiftTB;

# start_tb(dir, port (default: a free one), motors => N|LIST,
#          dispatchers => N, args => [...])
sub start_tb {
    my (%a) = @_;
    my $port = $a{port} // GiftTest::free_port();
    my @argv = ('--port', $port, '--motors', $a{motors} // 8,
        '--dispatchers', $a{dispatchers} // 4, @{$a{args} // []});
    my $self = GiftTB::Proc::_spawn('GiftTB::Endpoint', 'tb',
        qr/serving MQTT/, %a, argv => \@argv);
    $self->{port} = $port;
    return $self;
}

# ------------------------------------------------------------ the motors
package GiftTB::Motors;
our @ISA = ('GiftTB::Proc');

# Rounds per device, as { motor_01 => N, ... }.
sub rounds {
    my ($self) = @_;
    my $t = $self->totals;
    return { map { $_ => $t->{devices}{$_}{rounds} } keys %{$t->{devices}} };
}

# Commands at run time ("offline D1,D2", "online ...", "silent ...",
# "slow D1,D2=MS", "latency A[-B]", "error-rate P", "speed R"); waits
# until applied.
sub control {
    my ($self, @lines) = @_;
    GiftTest::spurt($self->ctl_file, join('', map { "$_\n" } @lines));
    my $n = () = $self->log_text =~ /control: /g;
    kill 'USR2', $self->{pid};
    GiftTest::wait_until(10, sub {
        my $m = () = $self->log_text =~ /control: /g;
        $m >= $n + @lines;
    }, 0.02);
}

package GiftTB;

# start_motors(dir, port, motors => N|LIST, args => [...])
sub start_motors {
    my (%a) = @_;
    my $self;
    my @argv = ('--port', $a{port}, '--motors', $a{motors} // 8,
        @{$a{args} // []});
    # the control file's name is known before the start
    my $probe = bless { dir => $a{dir} // GiftTest::tempdir() }, 'GiftTB::Motors';
    $a{dir} = $probe->{dir};
    $self = GiftTB::Proc::_spawn('GiftTB::Motors', 'motors', qr/serving \d+ motors/,
        %a, argv => [ @argv, '--control', "$a{dir}/motors.control" ]);
    $self->{ctl} = "$a{dir}/motors.control";
    return $self;
}

sub GiftTB::Motors::ctl_file { $_[0]{ctl} }

# The MQTT side of a dispatcher test: the stand-in (endpoint + motors) by
# default; with GIFT_TB=tbsim (or without node), tbsim on mosquitto.
#   my $st = GiftTB::start_stack(dir => $dir, motors => 'motor_01,motor_x',
#       dispatchers => 1, tb_args => [...], motor_args => [...],
#       tbsim_args => [...]);
#   $st->{motors} (totals, rounds, control, stop), $st->{port},
#   $st->conf(N) (extra_mqtt of dispatcher N), $st->{tb} (the endpoint, or
#   undef), $st->{mq} (mosquitto, or undef)
sub use_standin { available() && ($ENV{GIFT_TB} // '') ne 'tbsim' }

sub start_stack {
    my (%a) = @_;
    my $self = bless { dir => $a{dir}, spec => $a{motors} // 8 }, 'GiftTB::Stack';
    if (use_standin()) {
        $self->{tb} = start_tb(dir => $a{dir}, motors => $a{motors} // 8,
            dispatchers => $a{dispatchers} // 1, args => $a{tb_args});
        $self->{motors} = start_motors(dir => $a{dir}, port => $self->{tb}->port,
            motors => $a{motors} // 8, args => $a{motor_args});
        $self->{port} = $self->{tb}->port;
    } else {
        $self->{mq} = GiftDispatch::start_mosquitto(dir => $a{dir});
        $self->{motors} = GiftDispatch::start_tbsim(dir => $a{dir},
            mqtt_port => $self->{mq}->port, args => $a{tbsim_args});
        $self->{port} = $self->{mq}->port;
    }
    return $self;
}

package GiftTB::Stack;

sub conf { $_[0]{tb} ? $_[0]{tb}->mqtt_conf($_[1] // 1) : '' }

# These motors receive and never answer (tbsim: "offline"; the motors:
# "silent", connected); $st->{motors}->control('online ...') undoes it.
sub mute {
    my ($self, $list) = @_;
    $self->{motors}->control(($self->{tb} ? 'silent ' : 'offline ') . $list);
}

# Stop the motors and start new ones (fresh counters) with these arguments,
# on the same endpoint or broker.
sub restart_motors {
    my ($self, @args) = @_;
    $self->{motors}->stop;
    $self->{motors} = $self->{tb}
        ? GiftTB::start_motors(dir => $self->{dir}, port => $self->{port},
            motors => $self->{spec}, args => [ @args ])
        : GiftDispatch::start_tbsim(dir => $self->{dir},
            mqtt_port => $self->{port}, args => [ @args ]);
    return $self->{motors};
}

sub stop {
    my ($self) = @_;
    $self->{motors}->stop;
    $self->{tb}->stop if $self->{tb};
}

package GiftTB;

1;
