#!/usr/bin/env bash
# Runs every imgd benchmark in sequence and prints their results together.
# Each benchmark measures its own baseline in the same run and prints ratios against it.
# Full outputs (results on stdout, progress on stderr) go to target/bench-results/.
# Usage: bash benches/run-all.sh [NAME...]   (default: all benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
all=(bench-index bench-proxy-rss bench-p2p bench-swarm bench-fleet-sim bench-lazy-start bench-containerd-start bench-mount-reads)
benches=("${@:-${all[@]}}")
out=target/bench-results
mkdir -p "$out"
cargo build --release --workspace --bins
failed=()
for b in "${benches[@]}"; do
  echo "== $b" >&2
  if ! cargo run -q --release -p imgd-benches --bin "$b" >"$out/$b.txt" 2>"$out/$b.log"; then
    echo "   $b failed: see $out/$b.log" >&2
    failed+=("$b")
  fi
done
echo
echo "# imgd benchmark results ($(date -u +%F), $(nproc) cores)"
for b in "${benches[@]}"; do
  echo
  echo "## $b"
  cat "$out/$b.txt"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
