"""t_pool: a python3 multiprocessing.Pool of 3 workers.

Usage: python3 t_pool.py WORKDIR [COUNT]
The pool (fork start method: handler threads in the parent, task and result queues over
pipes guarded by semaphores) computes COUNT items with imap; each item is a chain of sha256
plus a short sleep, and under a lock shared with every worker bumps a counter kept in
WORKDIR/pool-counter (read, modify, write). The parent prints "progress K" per result, in
order, checks the order and the counter, and prints "RESULT <digest of all results>" — the
same as an uninterrupted run — then PASS/FAIL lines and "DONE <failures>".
"""

import hashlib
import multiprocessing as mp
import os
import sys
import time

lock = None
counter_path = None


def init(l, path):
    global lock, counter_path
    lock = l
    counter_path = path


def work_item(i):
    h = hashlib.sha256(b"item %d" % i)
    for _ in range(3000):
        h = hashlib.sha256(h.digest())
    time.sleep(0.02)
    with lock:
        with open(counter_path, "r+") as f:
            v = int(f.read() or "0")
            f.seek(0)
            f.write(str(v + 1))
            f.truncate()
    return i, os.getpid(), h.hexdigest()[:16]


def main():
    work = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    failures = 0
    counter = os.path.join(work, "pool-counter")
    with open(counter, "w") as f:
        f.write("0")
    mp.set_start_method("fork")
    l = mp.Lock()
    print("READY", flush=True)
    total = hashlib.sha256()
    workers = set()
    with mp.Pool(3, initializer=init, initargs=(l, counter)) as pool:
        for k, (i, pid, d) in enumerate(pool.imap(work_item, range(count))):
            if i != k:
                print(f"FAIL result {k} is item {i}", flush=True)
                failures += 1
            workers.add(pid)
            total.update(d.encode())
            print(f"progress {k + 1}", flush=True)
    with open(counter) as f:
        v = int(f.read())
    ok = v == count
    print(f"{'PASS' if ok else 'FAIL'} counter updated under the lock {v} times, want {count}", flush=True)
    failures += 0 if ok else 1
    ok = len(workers) == 3
    print(f"{'PASS' if ok else 'FAIL'} {len(workers)} worker processes did the work, want the pool's 3", flush=True)
    failures += 0 if ok else 1
    print("RESULT " + total.hexdigest(), flush=True)
    print(f"DONE {failures}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
