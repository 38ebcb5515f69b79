#!/usr/bin/perl
# packaging/thingsboard/gift-rule-chain.json against ThingsBoard's own
# classes: every field of every node's configuration exists in its
# configuration class in every release from v3.6 on (ThingsBoard reads a
# node's configuration with a Jackson mapper that fails on unknown
# properties, and the node then never starts), the export has the import
# format, every connection label is one its node emits, every node that can
# fail has a Failure link that ends in an error reply to the dispatcher, and
# the RPC node's timeout leaves the dispatcher's default rpc_timeout_ms at
# least 1.5 s.  The field lists, with the releases and source files they
# come from, are t/fixtures/thingsboard-config-fields.json (written by
# tools/tbstandin/scripts/tb-config-fields.mjs from thingsboard/thingsboard).

use strict;
use warnings;
use Test::More;
use lib 't/lib';
use GiftTest;

my $root = GiftTest::root();
my $chain = $GiftTest::JSON->decode(
    GiftTest::slurp("$root/packaging/thingsboard/gift-rule-chain.json"));
my $tb = $GiftTest::JSON->decode(
    GiftTest::slurp("$root/t/fixtures/thingsboard-config-fields.json"));

my @tags = @{$tb->{tags}};
ok((grep { $_ eq 'v3.6' } @tags) && (grep { /^v4\.3/ } @tags),
    'field lists cover v3.6 to v4.3 (' . scalar(@tags) . ' releases)');

# Fields a class has in every listed release (plus inherited ones).
sub fields_everywhere {
    my ($class) = @_;
    my $c = $tb->{classes}{$class} or die "no field list for $class";
    my %n;
    my $groups = 0;
    for my $g (@{$c->{versions}}) {
        die "$class missing in @{$g->{tags}}" unless $g->{fields};
        $groups++;
        $n{$_}++ for @{$g->{fields}};
    }
    my %all = map { $_ => 1 } grep { $n{$_} == $groups } keys %n;
    $all{$_} = 1 for @{$tb->{inherited}{$class} // []};
    return \%all;
}

sub only_known {
    my ($what, $obj, $class) = @_;
    my $ok = fields_everywhere($class);
    my @bad = grep { !$ok->{$_} } sort keys %$obj;
    is_deeply(\@bad, [], "$what: only fields of $class in every release")
        or diag "unknown: @bad; $class has: " . join(' ', sort keys %$ok)
        . " ($tb->{classes}{$class}{source})";
}

# ------------------------------------------------------------ import format
is_deeply([ sort keys %$chain ], [ 'metadata', 'ruleChain' ],
    'an export: {ruleChain, metadata}');
only_known('ruleChain', $chain->{ruleChain}, 'RuleChain');
is($chain->{ruleChain}{type}, 'CORE', 'a CORE rule chain');
ok(!$chain->{ruleChain}{root}, 'not the root chain');
only_known('metadata', $chain->{metadata}, 'RuleChainMetaData');
my @nodes = @{$chain->{metadata}{nodes}};
my @conns = @{$chain->{metadata}{connections}};
my $first = $chain->{metadata}{firstNodeIndex};
ok(defined $first && $first >= 0 && $first <= $#nodes, 'firstNodeIndex is a node');
only_known("connection $_->{fromIndex}->$_->{toIndex}", $_, 'NodeConnectionInfo')
    for @conns;
ok(!grep({ $_->{fromIndex} < 0 || $_->{fromIndex} > $#nodes
           || $_->{toIndex} < 0 || $_->{toIndex} > $#nodes } @conns),
    'every connection joins two nodes');

# ------------------------------------------------------------ node configurations
my %labels = (
    TbTransformMsgNode     => [qw(Success Failure)],
    TbJsFilterNode         => [qw(True False Failure)],
    TbChangeOriginatorNode => [qw(Success Failure)],
    TbSendRPCRequestNode   => [qw(Success Failure)],
    TbSendRPCReplyNode     => [qw(Success Failure)],
);
{
    # the message type switch: a TbMsgType label in every release, or Other
    my %n;
    my $groups = @{$tb->{msgTypeLabels}{versions}};
    for my $g (@{$tb->{msgTypeLabels}{versions}}) { $n{$_}++ for @{$g->{labels}} }
    $labels{TbMsgTypeSwitchNode} = [ 'Other', grep { $n{$_} == $groups } keys %n ];
}
my %class_of;
for my $i (0 .. $#nodes) {
    my $n = $nodes[$i];
    my ($pkg, $class) = $n->{type} =~ /^(org\.thingsboard\.rule\.engine\.\w+)\.(\w+)$/;
    ok($class && $tb->{classes}{$class}, "node $i ($n->{name}): a known node type")
        or next;
    $class_of{$i} = $class;
    only_known("node $i ($n->{name})", $n, 'RuleNode');
    only_known("node $i ($n->{name}) configuration", $n->{configuration}, $class);
    if (my $q = $n->{configuration}{relationsQuery}) {
        only_known("node $i relationsQuery", $q, 'RelationsQuery');
        only_known("node $i relationsQuery filter", $_, 'RelationEntityTypeFilter')
            for @{$q->{filters} // []};
    }
    if (exists $n->{configuration}{scriptLang}) {
        is($n->{configuration}{scriptLang}, 'TBEL', "node $i: TBEL");
        is($n->{configuration}{jsScript}, $n->{configuration}{tbelScript},
            "node $i: the JavaScript copy is the TBEL script");
    }
    if ($class eq 'TbChangeOriginatorNode') {
        is_deeply([ @{$n->{configuration}}{qw(originatorSource entityType)} ],
            [ 'ENTITY', 'DEVICE' ], "node $i: a device by name pattern");
    }
}
for my $c (@conns) {
    my $class = $class_of{$c->{fromIndex}} // next;
    ok((grep { $_ eq $c->{type} } @{$labels{$class}}),
        "connection $c->{fromIndex}->$c->{toIndex}: '$c->{type}' is a label of $class");
}

# ------------------------------------------------------------ paths
my %next;
push @{$next{$_->{fromIndex}}{$_->{type}}}, $_->{toIndex} for @conns;
my %into;
push @{$into{$_->{toIndex}}}, $_->{fromIndex} for @conns;
my @path;
my $i = $first;
for my $rel ('RPC Request from Device', 'Success', 'True', 'Success', 'Success', undef) {
    push @path, $class_of{$i};
    last unless defined $rel;
    $i = $next{$i}{$rel}[0] // last;
}
is_deeply(\@path, [qw(TbMsgTypeSwitchNode TbTransformMsgNode TbJsFilterNode
    TbChangeOriginatorNode TbSendRPCRequestNode TbSendRPCReplyNode)],
    'switch -> pick target -> has a target? -> change originator -> rpc call'
    . ' request -> rpc call reply (no change back: the reply node finds the'
    . ' session by metadata)');
my $reply_cfg = $nodes[$i]{configuration};
is_deeply([ @$reply_cfg{qw(serviceIdMetaDataAttribute sessionIdMetaDataAttribute
    requestIdMetaDataAttribute)} ], [qw(serviceId sessionId requestId)],
    'the reply goes to the session of the request');

# An error path: the Error reply script, then an rpc call reply.
my ($err) = grep { $nodes[$_]{name} eq 'Error reply' } 0 .. $#nodes;
ok(defined $err && $class_of{$err} eq 'TbTransformMsgNode', 'an Error reply script');
my @err_replies = map { @{$next{$err}{$_} // []} } qw(Success Failure);
ok(@err_replies == 2 && !grep({ $class_of{$_} ne 'TbSendRPCReplyNode' } @err_replies),
    'Error reply: Success and Failure both go to an rpc call reply');
# Every node that can fail: a Failure link that ends in the error reply.  The
# exception is the error reply's own rpc call reply, which only the error
# path reaches: if the dispatcher's session is gone, nothing can answer.
for my $i (0 .. $#nodes) {
    next if $class_of{$i} eq 'TbMsgTypeSwitchNode';   # it cannot fail
    next if $i == $err;
    if ($class_of{$i} eq 'TbSendRPCReplyNode'
        && !grep({ $_ != $err } @{$into{$i} // []}))
    {
        pass("node $i ($nodes[$i]{name}): the error path's last reply");
        next;
    }
    is($next{$i}{Failure}[0], $err, "node $i ($nodes[$i]{name}): Failure -> Error reply");
}
ok(!grep({ $class_of{$_->{fromIndex}} ne 'TbMsgTypeSwitchNode'
           && $_->{type} eq 'Failure' && $_->{toIndex} != $err
           && $_->{fromIndex} != $err } @conns),
    'no Failure link goes anywhere else');

# ------------------------------------------------------------ timeouts
my ($rpc) = grep { $class_of{$_} eq 'TbSendRPCRequestNode' } 0 .. $#nodes;
my $t = $nodes[$rpc]{configuration}{timeoutInSeconds};
my ($disp) = GiftTest::slurp("$root/dispatcher/conf.c") =~ /rpc_timeout_ms\s*=\s*(\d+);/;
ok($t && $disp, "RPC node timeout ${t} s, dispatcher rpc_timeout_ms $disp");
cmp_ok($disp - 1000 * $t, '>=', 1500,
    'the dispatcher keeps at least 1.5 s beyond the RPC node for the queues');
my ($ex) = GiftTest::slurp("$root/dispatcher/gift-dispatcher.conf.example")
    =~ /rpc_timeout_ms\s*=\s*(\d+);/;
cmp_ok($ex - 1000 * $t, '>=', 1500, '... also in the example configuration');
my $doc = GiftTest::slurp("$root/docs/thingsboard.md");
like($doc, qr/timeout\W+$t\W*s/i, "docs/thingsboard.md gives the node's timeout ($t s)");

done_testing();
