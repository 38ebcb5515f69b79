#!/usr/bin/perl
# The ThingsBoard stand-in (tools/tbstandin: gift-tbstandin and gift-motors)
# as real processes, driven by MQTT clients that play the dispatcher, the
# motors and an observer (tools/tbstandin/test/standin.test.mjs, node's test
# runner): access tokens, one session per device, client-side RPC routed by
# the rule chain file to the motor's own server-side RPC topic and id
# sequence, the reply to the asking session only (dropped after the session
# reconnected), NO_ACTIVE_CONNECTION and TIMEOUT, a pending RPC delivered to
# a motor that connects in time, 64 KiB and invalid JSON closing the
# connection, the rate limit disconnecting, QoS at most 1, the read-only
# tap, a rule chain ThingsBoard would not start refused; the motors' window
# of event ids, answer on acceptance, speed, record and control.

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;

my $node = eval { GiftTest::find_bin('node') };
GiftTest::skip_all_unless($node, 'node not found');
my $dir = GiftTest::root() . '/tools/tbstandin';
GiftTest::skip_all_unless(-d "$dir/node_modules/aedes",
                          'npm packages of tools/tbstandin not installed (make deps)');

my $out = `cd '$dir' && timeout 300 '$node' --test --test-reporter=tap test/ 2>&1`;
is($?, 0, 'node --test tools/tbstandin/test') or diag $out;
my @ok = $out =~ /^ok \d+ - (.*)$/mg;
note "ok: $_" for @ok;
cmp_ok(scalar @ok, '>=', 5, 'every scenario ran');
done_testing();
