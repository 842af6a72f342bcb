#!/usr/bin/env bash
# Fuzzes every parser of on-disk and on-wire data (fuzz/fuzz_targets: manifest, pack,
# control) with libFuzzer, on the stable toolchain (the coverage flags cargo-fuzz would
# pass; `cargo fuzz run TARGET` works too where cargo-fuzz is installed). No
# AddressSanitizer: the parsers are safe Rust (`stasis-image` forbids `unsafe`), where it
# finds nothing that a panic or an overflow check does not, and it doubled the build time. Each target runs for SECONDS (default 60) from its corpus in
# fuzz/corpus/TARGET, to which new interesting inputs are added. A crash leaves its input in
# fuzz/artifacts/TARGET/ and fails the script: make it a regression test.
#
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
target=x86_64-unknown-linux-gnu
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cdebug-assertions -Coverflow-checks"
cargo build --quiet --release --target "$target" --bins
status=0
for t in manifest pack control; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "==> fuzzing $t for ${secs}s"
    if ! "./target/$target/release/$t" -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "corpus/$t" 2> "target/$t.log"; then
        status=1
        tail -40 "target/$t.log"
    fi
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "target/$t.log" | tail -1
done
exit $status
