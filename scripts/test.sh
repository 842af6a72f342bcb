#!/usr/bin/env bash
# The whole test suite of Stasis.
#
# 1. As root, installs the Debian packages the tests need (gcc, static libc, python3,
#    util-linux for setpriv/script, redis, MPICH and Open MPI for real-program tests, g++
#    for libFuzzer, Slurm and munge for the batch script).
# 2. Checks formatting and lints, builds, and runs every test as the current user; as root,
#    runs the Slurm batch script against a real slurmctld/slurmd (tests/slurm/run.sh); then
#    fuzzes every parser for a bounded time (scripts/fuzz.sh; STASIS_FUZZ_SECONDS per target,
#    default 40).
# 3. As root, runs every integration test a second time as the unprivileged user nobody
#    (setpriv --reuid=65534 --regid=65534 --clear-groups): Stasis must not depend on root.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each phase says how long the suite has run so far (the budget: well under 30 minutes on
# 2 cores).
phase() { echo "==> [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

if [ "$(id -u)" = 0 ]; then
    missing=()
    for pkg in gcc libc6-dev python3 util-linux redis-server redis-tools mpich libmpich-dev openmpi-bin libopenmpi-dev g++ \
        slurm-wlm munge; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        phase "installing ${missing[*]}"
        # Packages must not start their daemons (munge, slurmctld, slurmd): the tests start
        # their own, on their own configuration.
        added_policy=
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            added_policy=1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    fi
fi

phase "cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

phase "tests as $(id -un)"
cargo test --workspace

if [ "$(id -u)" = 0 ]; then
    phase "the Slurm batch script against a real slurmctld and slurmd"
    STASIS_BIN=target/debug/stasis ./tests/slurm/run.sh
fi

phase "fuzzing every parser of on-disk and on-wire data (bounded)"
./scripts/fuzz.sh "${STASIS_FUZZ_SECONDS:-40}"

if [ "$(id -u)" = 0 ]; then
    phase "integration tests again as the unprivileged user nobody"
    # Copy what the tests need where nobody can read it, whatever the checkout's permissions.
    stage=$(mktemp -d /tmp/stasis-nobody-XXXXXX)
    chmod 755 "$stage"
    mkdir -p "$stage/repo/tests" "$stage/bin"
    cp -r tests/programs "$stage/repo/tests/"
    cp -r include examples docs "$stage/repo/"
    cp target/debug/stasis "$stage/bin/stasis"
    cp target/debug/deps/libstasis.so target/debug/deps/libstasis.a "$stage/bin/"
    mapfile -t tests < <(cargo test -p stasis --tests --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
    for t in "${tests[@]}"; do
        cp "$t" "$stage/bin/"
    done
    chmod -R a+rX "$stage"
    status=0
    for t in "${tests[@]}"; do
        name=$(basename "$t")
        echo "--- $name (as nobody)"
        setpriv --reuid=65534 --regid=65534 --clear-groups \
            env -i PATH=/usr/bin:/bin HOME=/nonexistent TMPDIR=/tmp \
            STASIS_TEST_BIN="$stage/bin/stasis" STASIS_TEST_REPO="$stage/repo" \
            "$stage/bin/$name" || status=1
    done
    rm -rf "$stage"
    phase "done"
    exit $status
fi
phase "done"
