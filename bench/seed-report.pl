#!/usr/bin/perl
# bench/seed.sh's report: reads the giftbench runs of each stack and writes
# seed.json (every figure) and seed.md (the table); prints the table.
# Exit 1 when a stack lost, duplicated or mis-turned a gift.
use strict;
use warnings;
use JSON::PP;

my ($runs, $out_json, $out_md, $stacks, $ref_rate, $secs, $mix, $conns, $sse,
    $concurrency, $aof, $nodelay, $window, $step_secs, $ramp_stacks, $gomaxprocs, $sched) = @ARGV;
$window //= 0;
my $js = JSON::PP->new->canonical;
sub rd { my $f = shift; open(my $h, "<", $f) or return undef; local $/;
    my $d = eval { $js->decode(<$h>) }; $d }

my %PRODUCT = map { $_ => 1 } qw(api worker redis nats-server dispatcher);
my %STANDIN = map { $_ => 1 } qw(device mosquitto tbstandin motors tbsim);
sub group_of {
    my $n = shift;
    return "client" if $n eq "giftbench";
    return "product" if $PRODUCT{$n} || $n =~ /^nginx-/;
    return "stand-ins" if $STANDIN{$n};
    return "other";
}
sub summary {
    my $d = shift;
    return undef unless $d;
    my (%g, %p);
    for my $n (sort keys %{$d->{processes} // {}}) {
        my $x = $d->{processes}{$n};
        next if $x->{gone};
        my $grp = group_of($n);
        $p{$n} = { group => $grp, map { $_ => $x->{$_} }
            qw(cpu_s cpu_pct us_per_gift peak_rss_kb threads) };
        $g{$grp} += $x->{us_per_gift};
    }
    my $non202 = 0;
    $non202 += $d->{status}{$_} for grep { $_ ne "202" } keys %{$d->{status} // {}};
    return {
        accepted => $d->{accepted}, accepted_per_s => $d->{accepted_per_s},
        acked_per_s => $d->{acked_per_s}, lost => $d->{lost},
        dup_acks => $d->{dup_acks}, non_202 => $non202, status => $d->{status},
        latency_ms => $d->{latency_ms}, accept_latency_ms => $d->{accept_latency_ms},
        machine_cpu_pct => $d->{machine_cpu_pct}, others_cpu_pct => $d->{others_cpu_pct},
        window_seconds => $d->{window_seconds}, max_unacked => $d->{max_unacked},
        unacked_peak => $d->{unacked_peak},
        us_per_gift => { map { $_ => 0 + sprintf("%.1f", $g{$_}) } keys %g },
        processes => \%p, ok => $d->{ok},
    };
}

my %doc = (bench => "seed", date => scalar(gmtime) . " UTC", seconds => 0 + $secs,
    cpus => 0 + `nproc`, loadavg_at_end => do { open(my $l, "<", "/proc/loadavg");
        my $x = <$l> // ""; chomp $x; $x },
    settings => { mix => $mix, conns => 0 + $conns, sse_clients => 0 + $sse,
        reference_rate => 0 + $ref_rate, seed_worker_concurrency => 0 + $concurrency,
        closed_loop_max_unacked => 0 + $window, step_seconds => 0 + ($step_secs // 5),
        ramp_stacks => $ramp_stacks // "",
        seed_redis_aof => 0 + $aof, seed_mqtt_nodelay => 0 + ($nodelay // 1),
        nats_gomaxprocs => ($gomaxprocs // "") eq "" ? "go default" : 0 + $gomaxprocs,
        product_sched => ($sched // "") eq "" ? "default" : $sched },
    groups => { product => "seed: api, worker, redis; ours: nginx master and "
        . "workers, nats-server, dispatcher", "stand-ins" => "seed: device, mosquitto; "
        . "ours: tbstandin, motors (run), mosquitto, tbsim (tuned)",
        client => "giftbench" });
$doc{ceiling} = summary(rd("$runs/client-ceiling.json"));
my $ok = 1;
my @st = split ' ', $stacks;
for my $s (@st) {
    my $ref = summary(rd("$runs/$s-reference.json"));
    my $sat = summary(rd("$runs/$s-saturate.json"));
    my $rounds = rd("$runs/$s-rounds.json") // {};
    my $acks = rd("$runs/$s-acks.json");
    my $rr = rd("$runs/$s-ramp-result.json");
    # the open-loop steps, with bench/seed.sh's verdict (bench/lib.sh's
    # sustained(), logged as "RATE ATTEMPT 1|0")
    my %verdict;
    if (open(my $l, "<", "$runs/$s-ramp.log")) {
        while (<$l>) { my ($r, $a, $v) = split; $verdict{"$r-$a"} = $v }
    }
    my @ramp;
    for my $f (glob "$runs/$s-ramp-*-*.json") {
        my ($r, $a) = $f =~ /-ramp-(\d+)-(\d+)\.json$/ or next;
        my $x = summary(rd($f)) or next;
        push @ramp, { rate => 0 + $r, attempt => 0 + $a, %$x,
            sustained => $verdict{"$r-$a"} ? JSON::PP::true : JSON::PP::false };
    }
    @ramp = sort { $a->{rate} <=> $b->{rate} || $a->{attempt} <=> $b->{attempt} } @ramp;
    my ($top) = reverse grep { $_->{sustained} } @ramp;
    # a run's "lost" is no acknowledgement within its grace period; where
    # GIFT_ACKS was counted (ours), a gift is lost only if its GiftAck never
    # came; ramp steps that were not sustained may be late, the others not
    my $late = 0; $late += $_->{lost} // 0 for @ramp;
    my $never = $acks ? ($acks->{accepted} > $acks->{stored} ? $acks->{accepted} - $acks->{stored} : 0) : undef;
    my $rounds_ok = defined $rounds->{turned} && ($rounds->{turned} == $rounds->{expected}
        || (($rounds->{late_acks} // 0) > 0 && $rounds->{turned} > $rounds->{expected}));
    my $good = $ref && $sat && !$ref->{lost} && !$ref->{dup_acks} && !$ref->{non_202}
        && !$sat->{lost} && !$sat->{dup_acks} && !grep({ $_->{dup_acks} } @ramp)
        && !grep({ $_->{sustained} && $_->{lost} } @ramp)
        && (!$acks || !$never) && $rounds_ok;
    $ok &&= $good;
    my @others = grep { defined } map { $_ && $_->{others_cpu_pct} } $ref, $sat, @ramp;
    $doc{stacks}{$s} = { reference => $ref, saturate => $sat, rounds => $rounds,
        ramp => \@ramp,
        max_sustained_rate => $rr ? 0 + $rr->{max_sustained_rate} : undef,
        not_sustained_at => $rr ? 0 + $rr->{not_sustained_at} : undef,
        ramp_steps => $rr ? $rr->{steps} : undef,
        highest_sustained_step => $top,
        acknowledgements => $acks ? { accepted => 0 + $acks->{accepted},
            stored_in_gift_acks => 0 + $acks->{stored}, never_acknowledged => $never,
            late_in_ramp_steps => $late, waited_s => 0 + $acks->{waited_s} } : undef,
        others_cpu_pct => { min => (sort { $a <=> $b } @others)[0],
            max => (sort { $b <=> $a } @others)[0] },
        ok => $good ? JSON::PP::true : JSON::PP::false };
}
# ratios: the seed stack's figure over ours (CPU, latency), ours over the
# seed's (throughput): above 1 is better for us; the issue's aim is 5
if (my $seed = $doc{stacks}{seed}) {
    for my $s (grep { $_ ne "seed" } @st) {
        my $o = $doc{stacks}{$s};
        my $div = sub { my ($a, $b) = @_; ($a && $b) ? 0 + sprintf("%.2f", $a / $b) : undef };
        $doc{ratios}{$s} = {
            saturate_acked_per_s => $div->($o->{saturate}{acked_per_s}, $seed->{saturate}{acked_per_s}),
            saturate_product_cpu => $div->($seed->{saturate}{us_per_gift}{product}, $o->{saturate}{us_per_gift}{product}),
            reference_product_cpu => $div->($seed->{reference}{us_per_gift}{product}, $o->{reference}{us_per_gift}{product}),
            reference_p99 => $div->($seed->{reference}{latency_ms}{p99}, $o->{reference}{latency_ms}{p99}),
            aim => 5,
        };
    }
}
$doc{ok} = $ok ? JSON::PP::true : JSON::PP::false;
open(my $o, ">", $out_json) or die "$out_json: $!";
print $o JSON::PP->new->canonical->pretty->encode(\%doc);
close $o;

# ---------------------------------------------------------------- markdown
my @md;
my $f = sub { my ($v, $fmt) = @_; defined $v ? sprintf($fmt // "%.0f", $v) : "-" };
push @md, "## Seed stack vs this project ($doc{date}, $doc{cpus} cores, load average at end: $doc{loadavg_at_end})",
    "", "Mix: $mix (cycled); $conns connections, $sse SSE client(s); reference rate $ref_rate gifts/s.",
    "Product = seed: api+worker+redis; ours: nginx+nats-server+dispatcher. Stand-ins = device simulator+broker (seed), ThingsBoard stand-in+motors (run), mosquitto+tbsim (tuned). CPU in us per accepted gift, from /proc.",
    "nats-server's GOMAXPROCS (run, tuned): $doc{settings}{nats_gomaxprocs}. Scheduling policy of every stack's product processes: $doc{settings}{product_sched}.",
    "";
push @md, "| figure | " . join(" | ", @st) . " |", "|---|" . join("|", map { "---" } @st) . "|";
my @rows = (
    ["saturate: acknowledged gifts/s" . ($window ? " (closed loop, at most $window unacknowledged)" : " (closed loop on 202s)"),
        sub { $f->($_[0]{saturate}{acked_per_s}) }],
    ["saturate: accepted gifts/s (202s)", sub { $f->($_[0]{saturate}{accepted_per_s}) }],
    ["saturate: p50 / p99 webhook -> SSE, ms", sub { $f->($_[0]{saturate}{latency_ms}{p50}, "%.1f") . " / "
        . $f->($_[0]{saturate}{latency_ms}{p99}, "%.1f") }],
    ["saturate: product us/gift", sub { $f->($_[0]{saturate}{us_per_gift}{product}) }],
    ["saturate: stand-ins us/gift", sub { $f->($_[0]{saturate}{us_per_gift}{"stand-ins"}) }],
    ["saturate: client us/gift", sub { $f->($_[0]{saturate}{us_per_gift}{client}) }],
    ["saturate: others on the machine, % CPU", sub { $f->($_[0]{saturate}{others_cpu_pct}) }],
    ["$ref_rate/s: accepted gifts/s", sub { $f->($_[0]{reference}{accepted_per_s}) }],
    ["$ref_rate/s: product us/gift", sub { $f->($_[0]{reference}{us_per_gift}{product}) }],
    ["$ref_rate/s: stand-ins us/gift", sub { $f->($_[0]{reference}{us_per_gift}{"stand-ins"}) }],
    ["$ref_rate/s: client us/gift", sub { $f->($_[0]{reference}{us_per_gift}{client}) }],
    ["$ref_rate/s: p50 webhook -> SSE, ms", sub { $f->($_[0]{reference}{latency_ms}{p50}, "%.2f") }],
    ["$ref_rate/s: p99 webhook -> SSE, ms", sub { $f->($_[0]{reference}{latency_ms}{p99}, "%.2f") }],
    ["$ref_rate/s: others on the machine, % CPU", sub { $f->($_[0]{reference}{others_cpu_pct}) }],
    ["maximum sustained rate, open loop (first step not sustained)", sub { defined $_[0]{max_sustained_rate}
        ? "**" . $f->($_[0]{max_sustained_rate}) . "** (" . $f->($_[0]{not_sustained_at}) . ")" : "-" }],
    ["at the highest sustained step: product us/gift", sub { $f->($_[0]{highest_sustained_step}{us_per_gift}{product}) }],
    ["at the highest sustained step: stand-ins us/gift", sub { $f->($_[0]{highest_sustained_step}{us_per_gift}{"stand-ins"}) }],
    ["at the highest sustained step: client us/gift", sub { $f->($_[0]{highest_sustained_step}{us_per_gift}{client}) }],
    ["at the highest sustained step: p50 / p99, ms", sub { my $t = $_[0]{highest_sustained_step}; $t
        ? $f->($t->{latency_ms}{p50}, "%.2f") . " / " . $f->($t->{latency_ms}{p99}, "%.2f") : "-" }],
    ["others on the machine, % CPU (min-max over the runs)", sub { my $o = $_[0]{others_cpu_pct};
        defined $o->{min} ? $f->($o->{min}) . "-" . $f->($o->{max}) : "-" }],
    ["lost / duplicated (reference and saturate)", sub { sprintf "%d / %d", ($_[0]{reference}{lost} // 0) + ($_[0]{saturate}{lost} // 0),
        ($_[0]{reference}{dup_acks} // 0) + ($_[0]{saturate}{dup_acks} // 0) }],
    ["GiftAcks in GIFT_ACKS for accepted gifts, all runs", sub { my $a = $_[0]{acknowledgements}; $a
        ? sprintf("%s of %s%s", $f->($a->{stored_in_gift_acks}), $f->($a->{accepted}),
            $a->{late_in_ramp_steps} ? " (" . $f->($a->{late_in_ramp_steps}) . " late in steps not sustained)" : "")
        : "-" }],
    ["rounds turned = expected", sub { my $r = $_[0]{rounds}; defined $r->{turned}
        ? ($r->{turned} == $r->{expected} ? "yes ($r->{turned})" : "NO ($r->{turned} of $r->{expected})") : "-" }],
);
for my $r (@rows) {
    push @md, "| $r->[0] | " . join(" | ", map { $r->[1]->($doc{stacks}{$_}) } @st) . " |";
}
push @md, "", sprintf("Client ceiling (giftbench vs giftbench echo, closed loop, same mix): %s acknowledged gifts/s, giftbench %s us/gift.",
    $f->($doc{ceiling}{acked_per_s}), $f->($doc{ceiling}{us_per_gift}{client}));
if ($doc{ratios}) {
    push @md, "", "| ratio (aim 5; above 1: ours better) | " . join(" | ", sort keys %{$doc{ratios}}) . " |",
        "|---|" . join("|", map { "---" } keys %{$doc{ratios}}) . "|";
    for my $k (qw(saturate_acked_per_s saturate_product_cpu reference_product_cpu reference_p99)) {
        push @md, "| $k | " . join(" | ", map { $f->($doc{ratios}{$_}{$k}, "%.2fx") } sort keys %{$doc{ratios}}) . " |";
    }
}
for my $s (grep { @{$doc{stacks}{$_}{ramp} // []} } @st) {
    my $x = $doc{stacks}{$s};
    push @md, "", "Open-loop steps of $s (${\($step_secs // 5)} s each; sustained: accepted >= 95% of the rate, nothing lost"
        . " or duplicated, every answer a 202, p99 <= 100 ms):", "",
        "| rate | accepted/s | p50 ms | p99 ms | lost (late) | product us/gift | stand-ins us/gift | client us/gift | others % CPU | sustained |",
        "|---|---|---|---|---|---|---|---|---|---|";
    for my $r (@{$x->{ramp}}) {
        push @md, sprintf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", $f->($r->{rate}), $f->($r->{accepted_per_s}),
            $f->($r->{latency_ms}{p50}, "%.2f"), $f->($r->{latency_ms}{p99}, "%.2f"), $f->($r->{lost}),
            $f->($r->{us_per_gift}{product}), $f->($r->{us_per_gift}{"stand-ins"}), $f->($r->{us_per_gift}{client}),
            $f->($r->{others_cpu_pct}), $r->{sustained} ? "yes" : "no";
    }
}
push @md, "", "Per process, us per gift:", "";
push @md, "| stack | process | group | $ref_rate/s | saturate | highest sustained step |", "|---|---|---|---|---|---|";
for my $s (@st) {
    my $x = $doc{stacks}{$s};
    for my $n (sort { ($x->{saturate}{processes}{$a}{group} // "") cmp ($x->{saturate}{processes}{$b}{group} // "") || $a cmp $b }
               keys %{$x->{saturate}{processes} // {}}) {
        push @md, sprintf "| %s | %s | %s | %s | %s | %s |", $s, $n, $x->{saturate}{processes}{$n}{group},
            $f->($x->{reference}{processes}{$n}{us_per_gift}, "%.1f"), $f->($x->{saturate}{processes}{$n}{us_per_gift}, "%.1f"),
            $f->($x->{highest_sustained_step}{processes}{$n}{us_per_gift}, "%.1f");
    }
}
push @md, "", "Verdict: " . ($ok ? "every stack acknowledged every gift once and turned its rounds"
    : "a stack LOST, duplicated or mis-turned gifts (see seed.json)"), "";
open(my $m, ">", $out_md) or die "$out_md: $!";
print $m join("\n", @md), "\n";
close $m;
print join("\n", @md), "\n";
exit($ok ? 0 : 1);
