#!/usr/bin/env bash
# make bench: run every benchmark in bench/*.sh, bench/ingest.sh first and
# the others in name order, and collect what they wrote.
#
# The contract for a bench/NAME.sh: it starts and stops its own servers on
# free loopback ports, exits non-zero when a check fails (not for being
# slow), and writes its figures as JSON into $GIFT_BENCH_OUT (build/bench),
# as NAME.json and/or NAME-<part>.json.  bench/lib.sh is not a benchmark:
# the others source it.
# This script then writes build/bench/summary.json: each run's exit status
# and duration, and the JSON files it wrote, by file name.
#
#   GIFT_BENCHES="ingest dispatch"   run only these (names without .sh)
set -uo pipefail
cd "$(dirname "$0")/.."

export GIFT_BENCH_OUT=${GIFT_BENCH_OUT:-$PWD/build/bench}
mkdir -p "$GIFT_BENCH_OUT"

benches=()
[[ -f bench/ingest.sh ]] && benches+=(bench/ingest.sh)
for b in bench/*.sh; do
    [[ -f $b && $b != bench/ingest.sh && $b != bench/report.sh &&
       $b != bench/lib.sh ]] \
        && benches+=("$b")
done
# the report reads every other bench's JSON: always last
[[ -f bench/report.sh ]] && benches+=(bench/report.sh)
if [[ -n ${GIFT_BENCHES:-} ]]; then
    keep=()
    for b in "${benches[@]}"; do
        name=$(basename "$b" .sh)
        [[ " $GIFT_BENCHES " == *" $name "* ]] && keep+=("$b")
    done
    benches=("${keep[@]}")
fi
if (( ${#benches[@]} == 0 )); then
    echo "make bench: no benchmark to run" >&2
    exit 1
fi

runs=$GIFT_BENCH_OUT/.runs
: >"$runs"
failed=0
for b in "${benches[@]}"; do
    name=$(basename "$b" .sh)
    echo "== $name ($b)"
    marker=$GIFT_BENCH_OUT/.start-$name
    touch "$marker"
    start=$(date +%s)
    bash "$b"
    rc=$?
    secs=$(( $(date +%s) - start ))
    # the JSON files this bench wrote: NAME.json, NAME-*.json
    files=$(find "$GIFT_BENCH_OUT" -maxdepth 1 \( -name "$name.json" -o \
        -name "$name-*.json" \) -newer "$marker" -printf '%f ' 2>/dev/null)
    rm -f "$marker"
    echo "$name $rc $secs $files" >>"$runs"
    if (( rc != 0 )); then
        echo "== $name FAILED (exit $rc)"
        failed=1
    fi
    echo
done

perl -MJSON::PP -e '
    my ($dir, $runs) = @ARGV;
    my $json = JSON::PP->new->canonical->pretty;
    my (%sum, @list);
    open(my $fh, "<", $runs) or die "$runs: $!";
    while (<$fh>) {
        my ($name, $rc, $secs, @files) = split;
        push @list, { bench => $name, exit => 0 + $rc, seconds => 0 + $secs,
            files => \@files };
        for my $f (@files) {
            open(my $j, "<", "$dir/$f") or next;
            local $/;
            my $d = eval { $json->decode(<$j>) };
            $sum{results}{$f} = $d // { error => "not JSON" };
        }
    }
    $sum{runs} = \@list;
    $sum{date} = scalar(gmtime) . " UTC";
    open(my $o, ">", "$dir/summary.json") or die;
    print $o $json->encode(\%sum);
    printf "%-20s %5s %8s  %s\n", "bench", "exit", "seconds", "wrote";
    printf "%-20s %5d %8d  %s\n", $_->{bench}, $_->{exit}, $_->{seconds},
        join(" ", @{$_->{files}}) for @list;
' "$GIFT_BENCH_OUT" "$runs"
rm -f "$runs"
echo "make bench: figures in $GIFT_BENCH_OUT (summary.json)"
exit $failed
