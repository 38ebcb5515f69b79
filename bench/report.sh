#!/usr/bin/env bash
# The benchmark report (issue 9): build/bench/report.md from the JSON the
# benchmarks wrote into $GIFT_BENCH_OUT (build/bench): ingest.json,
# dispatcher.json, fanout.json, e2e.json (and seed.md, bench/seed.sh's table,
# appended; wakeups.json, per process at a steady rate, after it).  Each stage stands next to the
# ceiling measured in the same run; when an aim is missed the report says
# which stage is the bottleneck, with its figures.
#
#   bench/report.sh            (make bench runs it after the others: bench/*.sh
#                               go in name order, and "report" sorts last)
#
# It measures nothing and starts nothing; a missing file is reported as
# "not run".  Exit status 0 unless no JSON at all was found.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GIFT_BENCH_OUT:-$PWD/build/bench}
mkdir -p "$OUT"

perl -MJSON::PP -e '
use strict;
use warnings;
my ($dir) = @ARGV;
my $js = JSON::PP->new->canonical;
sub rd {
    my $f = "$dir/$_[0]";
    open(my $h, "<", $f) or return undef;
    local $/;
    my $d = eval { $js->decode(<$h>) };
    return $d;
}
my %j = map { $_ => rd("$_.json") } qw(ingest dispatcher fanout e2e);
my @have = grep { $j{$_} } sort keys %j;
my $seed_md;
if (open(my $sh, "<", "$dir/seed.md")) { local $/; $seed_md = <$sh>; close $sh; }
my $seed = rd("seed.json");
unless (@have || $seed_md) {
    print STDERR "report: no benchmark JSON in $dir\n";
    exit 1;
}
sub n { my $v = shift; return "-" unless defined $v && $v =~ /^-?[\d.]+(?:e[-+]?\d+)?$/i;
    my $s = sprintf("%.0f", $v); 1 while $s =~ s/^(-?\d+)(\d{3})/$1,$2/; $s }
sub f { my ($v, $p) = @_; defined $v && $v =~ /^-?[\d.]+/ ? sprintf("%.${\($p // 2)}f", $v) : "-" }
sub pct { my ($x, $y) = @_; (defined $x && defined $y && $y) ? sprintf("%.0f%%", 100 * $x / $y) : "-" }
sub yes { $_[0] ? "met" : "**missed**" }

my @md;
sub p { push @md, @_ ? join("", @_) : "" }
my $cpus = 0 + `nproc`;
my $uname = `uname -sr`; chomp $uname;
my $cpu_model = "";
if (open(my $c, "<", "/proc/cpuinfo")) {
    while (<$c>) { if (/^model name\s*:\s*(.*)/) { $cpu_model = $1; last } }
}

p "# Benchmark report";
p;
p "Written by `bench/report.sh` (`make bench`) on ", scalar(gmtime), " UTC from the JSON in",
  " `build/bench/`. Machine: $cpus cores ($cpu_model), $uname. Load generators and",
  " servers share these cores, on loopback; every stage is shown next to a ceiling",
  " measured in the same run, so read ratios rather than absolute figures.";
p;
for my $k (qw(ingest dispatcher fanout e2e)) {
    p "- `$k.json`: ", $j{$k} ? ($j{$k}{date} // "present") : "not run";
}
p "- `seed.json`: ", $seed ? ($seed->{date} // "present") : "not run";
p;

# ------------------------------------------------------------ summary
my (@rows, @missed);
my $ing = $j{ingest};
if ($ing) {
    my $w = $ing->{webhook}{rps}; my $pl = $ing->{plain}{rps};
    my $ratio = $pl ? $w / $pl : 0;
    push @rows, [ "ingest: `POST /gift` -> 202 after the PubAck (nginx, $ing->{nginx_workers} worker)",
        n($w) . " req/s", "plain nginx 202 with the same body: " . n($pl) . " req/s"
        . (defined $ing->{discard}{rps} ? "; `return 202`: " . n($ing->{discard}{rps}) : ""),
        pct($w, $pl), ">= 40% of plain", yes($ratio >= 0.40) ];
    push @missed, "ingest" if $ratio < 0.40;
}
my $dsp = $j{dispatcher};
if ($dsp) {
    my $c = $dsp->{coalescing} // {};
    my $ce = $dsp->{ceilings} // {};
    my $aim = $dsp->{aim_gifts_per_s} // 30000;
    my $rate = $c->{gifts_per_s};
    push @rows, [ "dispatcher: pre-filled GIFTS -> RPC -> GiftAck (coalescing " .
        ($c->{coalesce_max_events} // "?") . ")", n($rate) . " gifts/s",
        "JetStream pull+ack " . n($ce->{jetstream_pull_ack_per_s}) . "/s; Mosquitto round trips "
        . n($ce->{mosquitto_rtt_window64_per_s}) . "/s (window 64)",
        pct($rate, $ce->{jetstream_pull_ack_per_s}) . " of pull", ">= " . n($aim) . " gifts/s",
        yes(($rate // 0) >= $aim) ];
    push @missed, "dispatcher" if ($rate // 0) < $aim;
}
my $fan = $j{fanout};
if ($fan && $fan->{results}) {
    for my $nc (sort { $a <=> $b } keys %{$fan->{results}}) {
        my $g = $fan->{results}{$nc}{gift} or next;
        my $c = $fan->{results}{$nc}{nchan};
        push @rows, [ "fan-out: SSE to " . n($nc) . " clients (1 worker)",
            n($g->{deliveries_per_s}) . " deliveries/s, lost " . n($g->{lost}),
            $c ? "nchan: " . n($c->{deliveries_per_s}) . " deliveries/s" : "-",
            $c ? pct($g->{deliveries_per_s}, $c->{deliveries_per_s}) : "-",
            "no loss, >= nchan", yes(!$g->{lost} && (!$c || $g->{deliveries_per_s} >= 0.9 * $c->{deliveries_per_s})) ];
        push @missed, "fanout" if $g->{lost};
    }
}
my $e = $j{e2e};
if ($e) {
    my $ceil = $e->{ceiling} // {};
    my $ref = $e->{reference} // {};
    push @rows, [ "end to end: maximum sustained rate (POST -> ack at 10 SSE clients)",
        n($e->{max_sustained_rate}) . " gifts/s",
        "giftbench vs trivial server: " . n($ceil->{accepted_per_s}) . " gifts/s",
        pct($e->{max_sustained_rate}, $ceil->{accepted_per_s}), ">= 20,000 gifts/s, 0 lost",
        yes(($e->{max_sustained_rate} // 0) >= 20000) ];
    push @rows, [ "end to end at " . n($ref->{rate}) . " gifts/s: latency p50 / p99",
        f($ref->{latency_ms}{p50}) . " / " . f($ref->{latency_ms}{p99}) . " ms",
        "trivial server, saturated: p50 " . f($ceil->{latency_ms}{p50}) . " ms", "-",
        "p99 < 3 ms", yes(($ref->{latency_ms}{p99} // 1e9) < 3) ];
    my $lost = $e->{aims}{lost}{measured} // 0;
    my $ak = $e->{acknowledgements} // {};
    push @rows, [ "end to end: accepted gifts never acknowledged, all runs",
        n($lost) . (($ak->{late_counted_as_lost} // 0) ? " (" . n($ak->{late_counted_as_lost})
            . " acknowledged only after the grace period of a run, in overloaded steps)" : ""),
        "GIFT_ACKS holds " . n($ak->{stored_in_gift_acks}) . " for " . n($ak->{accepted})
        . " accepted; motors turned " . n($e->{motors}{rounds}) . " of " . n($e->{motors}{expected})
        . " rounds", "-", "0", yes(!$lost && $e->{motors}{equal}) ];
    push @missed, "e2e-rate" if ($e->{max_sustained_rate} // 0) < 20000;
    push @missed, "e2e-p99" if ($ref->{latency_ms}{p99} // 1e9) >= 3;
    push @missed, "e2e-lost" if $lost || !$e->{motors}{equal};
}
# the seed comparison (bench/seed.sh): its headline figures per stack of
# ours, next to the seed stack and the client ceiling of that run
if ($seed && $seed->{stacks}) {
    my $sd = $seed->{stacks}{seed};
    my $ceil = $seed->{ceiling} // {};
    for my $s (grep { $_ ne "seed" } sort keys %{$seed->{stacks}}) {
        my $x = $seed->{stacks}{$s};
        my $o = $x->{others_cpu_pct} // {};
        push @rows, [ "seed comparison, $s: closed loop acknowledged gifts/s; maximum sustained (open loop)",
            n($x->{saturate}{acked_per_s}) . "; " . n($x->{max_sustained_rate}) . " gifts/s"
            . " (others: " . n($o->{min}) . "-" . n($o->{max}) . "% CPU)",
            ($sd ? "seed stack: " . n($sd->{saturate}{acked_per_s}) . "; " : "")
            . "client ceiling: " . n($ceil->{acked_per_s}),
            $sd ? pct($x->{saturate}{acked_per_s}, $sd->{saturate}{acked_per_s}) : "-",
            "5x the seed", $sd ? yes(($x->{saturate}{acked_per_s} // 0)
                >= 5 * ($sd->{saturate}{acked_per_s} // 1e99)) : "-" ];
        push @rows, [ "seed comparison, $s at " . n($seed->{settings}{reference_rate}) . " gifts/s: product us/gift; p50 / p99",
            n($x->{reference}{us_per_gift}{product}) . " us; " . f($x->{reference}{latency_ms}{p50})
            . " / " . f($x->{reference}{latency_ms}{p99}) . " ms",
            $sd ? "seed stack: " . n($sd->{reference}{us_per_gift}{product}) . " us; p99 "
            . f($sd->{reference}{latency_ms}{p99}) . " ms" : "-", "-",
            "1/5 of the seed stack", $sd ? yes(($x->{reference}{us_per_gift}{product} // 1e99) * 5
                <= ($sd->{reference}{us_per_gift}{product} // 0)) : "-" ];
    }
}
p "## Summary";
p;
p "| stage | ours | ceiling, same run | ratio | aim | |";
p "|---|---|---|---|---|---|";
p "| ", join(" | ", @$_), " |" for @rows;
p;
if ($e) {
    my @o = grep { defined } map { $_->{others_cpu_pct} } grep { ref $_ eq "HASH" }
        $e->{reference}, $e->{saturate}, @{$e->{ramp} // []};
    my ($omax) = sort { $b <=> $a } @o;
    if (defined $omax && $omax >= 20) {
        p "**Noise:** other programs used up to ", n($omax), "% of the machine (100% = one core)",
          " during the end-to-end runs; their rates and latencies are lower bounds, while the",
          " CPU cost per gift (below) is the steadier figure.";
        p;
    }
}

# ------------------------------------------------------------ stages
if ($ing) {
    p "## Ingest (`bench/ingest.sh`)";
    p;
    p "wrk, $ing->{wrk}{threads} threads, $ing->{wrk}{connections} keep-alive connections, unique canonical",
      " gifts (`bench/gift.lua`), nginx with $ing->{nginx_workers} worker; nats-server with a file store.";
    p;
    p "| location | req/s | p50 ms | p99 ms |";
    p "|---|---|---|---|";
    for my $k (qw(webhook plain discard)) {
        my $x = $ing->{$k} or next;
        p "| ", { webhook => "`/gift` (the module)", plain => "`/plain` (body read, 202)",
            discard => "`/discard` (`return 202`)" }->{$k}, " | ", n($x->{rps}), " | ",
            f(($x->{p50_us} // 0) / 1000), " | ", f(($x->{p99_us} // 0) / 1000), " |";
    }
    p;
    p "Every 202 stored in GIFTS: ", ($ing->{gifts}{every_202_stored} ? "yes" : "**no**"),
      " (", n($ing->{gifts}{stored}), " stored, ", n($ing->{gifts}{accepted}), " answered 202).";
    p;
}
if ($dsp) {
    my $c = $dsp->{coalescing} // {}; my $s = $dsp->{no_coalescing} // {};
    my $ce = $dsp->{ceilings} // {};
    p "## Dispatcher (`bench/dispatcher.sh`)";
    p;
    p n($dsp->{gifts}), " gifts pre-filled in GIFTS over ", $dsp->{devices} // "?", " devices; ThingsBoard: ",
      $dsp->{thingsboard} // ("tbsim at " . ($dsp->{tbsim_latency_ms} // 0) . " ms"), ".";
    p;
    p "| run | gifts/s | RPCs | peak RSS MiB |";
    p "|---|---|---|---|";
    p "| coalescing (", $c->{coalesce_max_events} // "?", " per RPC) | ", n($c->{gifts_per_s}), " | ",
      n($c->{rpcs}), " | ", f(($c->{peak_rss_kib} // 0) / 1024, 1), " |";
    p "| no coalescing | ", n($s->{gifts_per_s}), " | ", n($s->{rpcs}), " | ",
      f(($s->{peak_rss_kib} // 0) / 1024, 1), " |" if %$s;
    for ([ "coalescing, through the ThingsBoard stand-in", $dsp->{coalescing_through_tbstandin} ],
         [ "coalescing, through tbsim on mosquitto", $dsp->{coalescing_through_tbsim} ]) {
        my ($what, $r) = @$_;
        next unless $r && $r->{gifts_per_s};
        p "| $what | ", n($r->{gifts_per_s}), " | ", n($r->{rpcs}), " | ",
          f(($r->{peak_rss_kib} // 0) / 1024, 1), " |";
    }
    p "| ceiling: JetStream pull + ack | ", n($ce->{jetstream_pull_ack_per_s}), " | | |";
    p "| ceiling: Mosquitto round trips, window 8 | ", n($ce->{mosquitto_rtt_window8_per_s}),
      " | p50 ", n($ce->{mosquitto_rtt_window8_p50_us}), " us | |" if defined $ce->{mosquitto_rtt_window8_per_s};
    p "| ceiling: Mosquitto round trips, window 64 | ", n($ce->{mosquitto_rtt_window64_per_s}),
      " | p50 ", n($ce->{mosquitto_rtt_window64_p50_us}), " us | |" if defined $ce->{mosquitto_rtt_window64_per_s};
    p;
    p $dsp->{note} if $dsp->{note};
    p if $dsp->{note};
}
if ($fan && $fan->{results}) {
    p "## Fan-out (`bench/fanout.sh`)";
    p;
    my $st = $fan->{settings} // {};
    p "SSE clients of one nginx worker; ours follows GIFT_ACKS (messages published to JetStream),",
      " nchan gets the same JSON POSTed to its publisher. Latency phase at ",
      n($st->{lat_deliveries_per_s}), " deliveries/s.";
    p;
    p "| clients | server | deliveries/s (max) | p50 ms | p99 ms | lost | KiB per idle client |";
    p "|---|---|---|---|---|---|---|";
    for my $nc (sort { $a <=> $b } keys %{$fan->{results}}) {
        for my $sv (qw(gift nchan)) {
            my $x = $fan->{results}{$nc}{$sv} or next;
            p "| ", n($nc), " | ", ($sv eq "gift" ? "ours" : "nchan"), " | ", n($x->{deliveries_per_s}),
              " | ", f(($x->{p50_us} // 0) / 1000), " | ", f(($x->{p99_us} // 0) / 1000), " | ",
              n($x->{lost}), " | ", f($x->{kib_per_idle_client}), " |";
        }
    }
    p;
    if (my $s = $fan->{client_selftest}) {
        p "Client ceiling (fanbench against a trivial SSE server): ",
          n($s->{max}{deliveries_per_s}), " deliveries/s.";
        p;
    }
    if (my $bc = $fan->{burst_check}) {
        p "Burst check: ", (ref $bc eq "HASH" ? $bc->{result} // "" : $bc);
        p;
    }
}
if ($e) {
    my $ceil = $e->{ceiling} // {}; my $ref = $e->{reference} // {};
    my $sat = $e->{saturate} // {};
    my $set = $e->{settings} // {};
    p "## End to end (`bench/e2e.sh`)";
    p;
    p "nginx (2 workers, ", ($set->{signed} ? "HMAC-signed webhooks" : "unsigned webhooks"),
      ") -> JetStream -> gift-dispatcher -> ",
      ($set->{thingsboard} // "") =~ /^stand-in/
        ? "the ThingsBoard stand-in (rule chain, 1 ms per queue hop) -> motors (MQTT sessions, 0 ms)"
        : "Mosquitto -> tbsim (0 ms)",
      " -> GIFT_ACKS -> nginx -> ",
      $set->{sse_clients} // "?", " SSE clients, all on this machine, driven by `giftbench` (",
      $set->{conns} // "?", " keep-alive connections, ", $set->{threads} // 1,
      " sender thread). Latency: from the intended send time of each gift (open loop) to its",
      " acknowledgement at the first SSE client. A step is sustained when the accepted rate is",
      " at least 95% of the offered one, nothing is lost or duplicated, every answer is 202 and",
      " p99 <= ", $set->{p99_bound_ms} // 100, " ms.";
    p;
    p "| run | offered/s | accepted/s | acked/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | lost | dup | machine CPU % | others % | sustained |";
    p "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";
    my $row = sub {
        my ($name, $r, $x) = @_;
        return unless $x && %$x;
        my $l = $x->{latency_ms} // {};
        p "| $name | $r | ", n($x->{accepted_per_s}), " | ", n($x->{acked_per_s}), " | ",
          f($l->{p50}), " | ", f($l->{p90}), " | ", f($l->{p99}), " | ", f($l->{p999}), " | ",
          f($l->{max}), " | ", n($x->{lost}), " | ", n($x->{dup_acks}), " | ",
          n($x->{machine_cpu_pct}), " | ", n($x->{others_cpu_pct}), " | ",
          (exists $x->{sustained} ? ($x->{sustained} ? "yes" : "no") : "-"), " |";
    };
    $row->("ceiling: giftbench vs `giftbench echo`", "max", $ceil);
    $row->("reference", n($ref->{rate}), $ref);
    $row->("saturated (closed loop)", "max", $sat);
    $row->("ramp", n($_->{rate}), $_) for @{$e->{ramp} // []};
    p;
    p "Maximum sustained rate: **", n($e->{max_sustained_rate}), " gifts/s**",
      ($e->{not_sustained_at} ? " (" . n($e->{not_sustained_at}) . " gifts/s was not)" : ""),
      ". Motors: ", n($e->{motors}{rounds}), " rounds turned for ", n($e->{motors}{expected}),
      " expected: ", ($e->{motors}{equal} ? "equal" : "**mismatch**"), ".";
    p;
    my $proc_table = sub {
        my ($title, $x) = @_;
        return unless $x && $x->{processes};
        my %ps = %{$x->{processes}};
        p "$title";
        p;
        p "| process | CPU s | CPU % | CPU us per gift | peak RSS MiB | threads |";
        p "|---|---|---|---|---|---|";
        for my $k (sort { ($ps{$b}{cpu_pct} // 0) <=> ($ps{$a}{cpu_pct} // 0) } keys %ps) {
            my $q = $ps{$k};
            p "| $k | ", f($q->{cpu_s}), " | ", f($q->{cpu_pct}, 1), " | ", f($q->{us_per_gift}, 1),
              " | ", f(($q->{peak_rss_kb} // 0) / 1024, 1), " | ", $q->{threads} // "-", " |";
        }
        p;
    };
    $proc_table->("Processes at " . n($ref->{rate}) . " gifts/s (reference):", $ref);
    my @rp = @{$e->{ramp} // []};
    my ($fail) = reverse grep { !$_->{step_sustained} && $_->{rate} == ((sort { $a <=> $b }
        map { $_->{rate} } grep { !$_->{step_sustained} } @rp)[0] // -1) } @rp;
    my ($last_ok) = reverse grep { $_->{sustained} } @rp;
    $proc_table->("Processes at " . n($last_ok->{rate}) . " gifts/s (the highest sustained step):", $last_ok)
        if $last_ok;
    $proc_table->("Processes at " . n($fail->{rate}) . " gifts/s (the first step not sustained):", $fail)
        if $fail;
    $proc_table->("Processes of the ceiling run (giftbench and its echo server):", $ceil);
}

# ------------------------------------------------------------ bottleneck
if (@missed) {
    p "## Bottleneck";
    p;
    p "Aims missed: ", join(", ", @missed), ".";
    p;
    if ($e && $e->{bottleneck}) {
        my $bn = $e->{bottleneck};
        p "**End to end** (", $bn->{at}, "): ", $bn->{verdict} // "?", ".";
        p;
        my @by = @{$bn->{by_cpu} // []};
        if (@by) {
            p "CPU per gift by process there (the stack: ", f($bn->{stack_us_per_gift}, 1),
              " us per gift, so at most about ", n($bn->{projected_max_per_s}),
              " gifts/s on $cpus cores if nothing else ran, the load generator included):";
            p;
            p "| process | CPU % | CPU us per gift | alone on one core it would allow (gifts/s) |";
            p "|---|---|---|---|";
            for my $x (@by) {
                p "| $x->{process} | ", f($x->{cpu_pct}, 1), " | ", f($x->{us_per_gift}, 1), " | ",
                  ($x->{us_per_gift} ? n(1e6 / $x->{us_per_gift}) : "-"), " |";
            }
            if (my $g = $bn->{giftbench}) {
                p "| (giftbench, the client) | ", f($g->{cpu_pct}, 1), " | ", f($g->{us_per_gift}, 1),
                  " | ", ($g->{us_per_gift} ? n(1e6 / $g->{us_per_gift}) : "-"), " |";
            }
            p;
        }
        if (my $c = $e->{capacity}) {
            if (%$c) {
                my %bp = %{$c->{by_process} // {}};
                my @bp = sort { ($bp{$b} // 0) <=> ($bp{$a} // 0) } keys %bp;
                p "**Capacity.** When saturated (the most batching), the stack spent ",
                  f($c->{stack_us_per_gift}, 1), " us of CPU per gift and giftbench ",
                  f($c->{giftbench_us_per_gift}, 1), " us: on $cpus cores that allows about ",
                  n($c->{projected_max_per_s}), " gifts/s (", n($c->{projected_max_without_client_per_s}),
                  " without the client), whatever else loads the machine. 20,000 gifts/s on $cpus",
                  " cores leaves ", f($c->{us_per_gift_budget_at_20000}, 0),
                  " us per gift for everything. By process (us per gift): ",
                  join(", ", map {; "$_ " . f($bp{$_}, 1) } @bp), ".";
                p;
            }
        }
        p "The load generator is not the limit: against its trivial server it drove ",
          n($e->{ceiling}{accepted_per_s}), " gifts/s (", pct($e->{max_sustained_rate},
          $e->{ceiling}{accepted_per_s}), " of that is what the pipeline sustained).";
        p;
    }
    # the stages, each alone, against the end-to-end aim
    my @cap;
    push @cap, [ "ingest (webhook, 1 worker)", $ing->{webhook}{rps} ] if $ing;
    push @cap, [ "dispatcher (coalescing)", $dsp->{coalescing}{gifts_per_s} ] if $dsp;
    if (@cap) {
        p "Stages measured alone (each with the whole machine), against the end-to-end aim of 20,000 gifts/s:";
        p;
        p "| stage | alone, gifts/s | vs 20,000 |";
        p "|---|---|---|";
        p "| $_->[0] | ", n($_->[1]), " | ", pct($_->[1], 20000), " |" for @cap;
        p "| end to end, sustained | ", n($e->{max_sustained_rate}), " | ",
          pct($e->{max_sustained_rate}, 20000), " |" if $e;
        p;
        my ($low) = sort { ($a->[1] // 0) <=> ($b->[1] // 0) } @cap;
        p "The slowest stage alone is ", $low->[0], " at ", n($low->[1]), " gifts/s. End to end,",
          " every stage shares the same cores, so the whole is bounded by the sum of the",
          " per-gift CPU costs above rather than by the slowest stage.";
        p;
    }
    if ($e && grep { /^e2e-p99$/ } @missed) {
        my $r = $e->{reference};
        p "**Latency at ", n($r->{rate}), " gifts/s**: p99 ", f($r->{latency_ms}{p99}), " ms end to end;",
          " of it, the 202 (webhook -> PubAck) p99 is ", f($r->{accept_latency_ms}{p99}), " ms and",
          " the send lag of giftbench itself p99 ", f($r->{send_lag_ms}{p99}), " ms. Other programs used ",
          n($r->{others_cpu_pct}), "% of the machine meanwhile.";
        p;
    }
}

# ------------------------------------------------------------ seed stack
# bench/seed.sh wrote its own table (seed.md): the seed stack of the
# design notes against this project, same run
if ($seed_md) {
    p;
    p $seed_md;
}

# ------------------------------------------------------------ wakeups
# bench/wakeups.sh: the make run stack at a steady rate, per process
my $wk = rd("wakeups.json");
if ($wk && @{$wk->{rounds} // []}) {
    p;
    p "## Per gift at a steady rate (`bench/wakeups.sh`, $wk->{date}; nats-server GOMAXPROCS $wk->{nats_gomaxprocs}, product scheduling policy " . ($wk->{product_sched} // "default") . ")";
    p;
    p "| round | rate | p50 / p99 ms | process | us/gift | context switches/gift |";
    p "|---|---|---|---|---|---|";
    for my $r (@{$wk->{rounds}}) {
        for my $name (sort keys %{$r->{processes}}) {
            my $x = $r->{processes}{$name};
            p "| $r->{round} | $r->{rate} | ", f($r->{latency_ms}{p50}), " / ",
                f($r->{latency_ms}{p99}), " | $name | ", f($x->{us_per_gift}, 1),
                " | ", f($x->{ctx_per_gift}), " |";
        }
    }
}

open(my $o, ">", "$dir/report.md") or die "$dir/report.md: $!";
print $o join("\n", @md), "\n";
close $o;
print join("\n", @md[0 .. ($#md < 40 ? $#md : 40)]), "\n" if -t STDOUT;
print STDERR "report: wrote $dir/report.md\n";
' "$OUT"
