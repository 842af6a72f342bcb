"""pystate: interpreter state that must survive checkpoint/restart of an unmodified python3.

Usage: python3 pystate.py WORKDIR
Before READY: a generator is consumed half-way, a dict is built (with deletions), the
`random` module is seeded and drawn from, and lines are appended to WORKDIR/py.log
(the file stays open). After WORKDIR/go exists the work goes on to the end, each result is
checked against a fresh recomputation in the same process (PASS/FAIL lines), and a final
deterministic digest is printed as "RESULT <hex>" (the test compares it with an
uninterrupted run), then "DONE <failures>".
"""

import hashlib
import os
import random
import sys
import time

STEPS = 400
HALF = 200


def walker(seed):
    """A generator with state in its frame: a running hash chain and a counter."""
    acc = seed
    for i in range(STEPS):
        acc = (acc * 6364136223846793005 + 1442695040888963407 + i) % (1 << 64)
        yield i, acc


def main():
    work = sys.argv[1]
    go = os.path.join(work, "go")
    failures = 0

    def report(ok, what):
        nonlocal failures
        if not ok:
            failures += 1
        print(("PASS " if ok else "FAIL ") + what, flush=True)

    gen = walker(12345)
    table = {}
    rng = random.Random(2024)
    random.seed(777)  # the module-level generator too
    log = open(os.path.join(work, "py.log"), "a")
    seen = []

    def step(k):
        i, acc = next(gen)
        seen.append(acc)
        key = "k%d" % (acc % 1000)
        table[key] = table.get(key, 0) + i
        if i % 7 == 3 and len(table) > 5:
            del table[next(iter(table))]
        draw = rng.random() + random.randint(0, 10 ** 6)
        log.write("step %d acc %d draw %.12f\n" % (i, acc, draw))
        log.flush()
        if k % 50 == 0:
            print("progress %d" % k, flush=True)
        return draw

    draws = [step(k) for k in range(HALF)]
    print("READY", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)

    draws += [step(k) for k in range(HALF, STEPS)]
    remaining = list(gen)
    log.close()

    # recompute everything from scratch, uninterrupted, in this process
    gen2 = walker(12345)
    seen2 = [acc for _, acc in gen2]
    rng2 = random.Random(2024)
    mod2 = random.Random(777)
    table2 = {}
    draws2 = []
    lines2 = []
    for i, acc in enumerate(seen2):
        key = "k%d" % (acc % 1000)
        table2[key] = table2.get(key, 0) + i
        if i % 7 == 3 and len(table2) > 5:
            del table2[next(iter(table2))]
        d = rng2.random() + mod2.randint(0, 10 ** 6)
        draws2.append(d)
        lines2.append("step %d acc %d draw %.12f\n" % (i, acc, d))

    report(seen == seen2 and remaining == [], "generator resumed mid-iteration: %d values" % len(seen))
    report(table == table2 and list(table) == list(table2), "dict: %d entries, same order" % len(table))
    report(draws == draws2, "random state: %d draws match a fresh generator" % len(draws))
    with open(os.path.join(work, "py.log")) as f:
        content = f.read()
    report(content == "".join(lines2), "py.log: %d lines, each step exactly once" % content.count("\n"))

    h = hashlib.sha256()
    h.update(repr((seen, sorted(table.items()), draws)).encode())
    h.update(content.encode())
    print("RESULT %s" % h.hexdigest(), flush=True)
    print("DONE %d" % failures, flush=True)
    sys.exit(1 if failures else 0)


main()
