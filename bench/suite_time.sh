#!/usr/bin/env bash
# The test suite's wall time, before and after, side by side: each run from a fresh clone of this
# repository (a cold compilation cache, as CI and a new user have), revisions alternating.
#
#   bash bench/suite_time.sh [BEFORE [AFTER [RUNS [TIER]]]]   TIER: full (default) or quick (-m "not slow")
#   bash bench/suite_time.sh 1130368 HEAD 3 quick
#
# Prints one line per run (revision, wall seconds, pytest's summary line, and a probe of the host: the
# seconds a fixed Python loop took just before, ~1.35 s on a quiet 2-core AMD EPYC of these VMs,
# up to 2.3 s when the host is busy) and the median of each revision. Run it on a quiet machine: it
# measures whatever else the cores are doing too; compare revisions within one series only.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
before=${1:-HEAD~1}; after=${2:-HEAD}; runs=${3:-3}; tier=${4:-full}
args=(-q -p no:benchmark)
[ "$tier" = quick ] && args+=(-m "not slow")
declare -A times
for i in $(seq "$runs"); do
  for rev in "$before" "$after"; do
    d=$(mktemp -d)
    git clone -q "$repo" "$d" && git -C "$d" checkout -q "$(git -C "$repo" rev-parse "$rev")"
    probe=$(python -c 'import time
t = time.perf_counter()
s = 0
for i in range(20_000_000): s += i
print(f"{time.perf_counter() - t:.2f}")')
    start=$(date +%s.%N)
    summary=$(cd "$d" && python -m pytest "${args[@]}" 2>&1 | tail -1) || true
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    rm -rf "$d"
    printf "%-10s run %d  %7.1f s  %s  (probe %s s)\n" "$rev" "$i" "$wall" "$summary" "$probe"
    times[$rev]="${times[$rev]:-} $wall"
  done
done
for rev in "$before" "$after"; do
  median=$(echo "${times[$rev]}" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
  printf "%-10s %s tier, median of %d: %.1f s\n" "$rev" "$tier" "$runs" "$median"
done
