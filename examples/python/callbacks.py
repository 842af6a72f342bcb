"""libstasis from Python with ctypes: callbacks in every phase and a critical section.

    STASIS_LIB=target/debug/libstasis.so stasis run --name py -- python3 examples/python/callbacks.py WORKDIR

Prints an EVENT line per callback and ends with DONE 0 once WORKDIR/go exists. Without Stasis
every call is a no-op and the program behaves the same.
"""
import ctypes
import ctypes.util
import os
import sys
import time

PRE_CHECKPOINT, POST_CHECKPOINT, POST_RESTART = 0, 1, 2
OK, NOT_ACTIVE = 0, 1


class Event(ctypes.Structure):
    _fields_ = [("phase", ctypes.c_int), ("generation", ctypes.c_uint), ("is_restart", ctypes.c_int)]


CALLBACK = ctypes.CFUNCTYPE(None, ctypes.POINTER(Event), ctypes.c_void_p)
NAMES = {PRE_CHECKPOINT: "pre", POST_CHECKPOINT: "post", POST_RESTART: "restart"}


def on_event(event, _arg):
    e = event.contents
    print(f"EVENT {NAMES[e.phase]} python gen={e.generation} restart={e.is_restart}", flush=True)


# Kept alive for as long as the library may call it.
on_event_c = CALLBACK(on_event)


def main():
    workdir = sys.argv[1]
    lib = ctypes.CDLL(os.environ.get("STASIS_LIB") or ctypes.util.find_library("stasis") or "libstasis.so")
    lib.stasis_register.argtypes = [ctypes.c_int, CALLBACK, ctypes.c_void_p]
    active = lib.stasis_is_active()
    print(f"ACTIVE {active}", flush=True)
    failures = 0
    for phase in (PRE_CHECKPOINT, POST_CHECKPOINT, POST_RESTART):
        rc = lib.stasis_register(phase, on_event_c, None)
        if rc != (OK if active else NOT_ACTIVE):
            print(f"FAIL register phase {phase}: {rc}", flush=True)
            failures += 1
    print("READY", flush=True)
    while not os.path.exists(os.path.join(workdir, "go")):
        lib.stasis_critical_enter()
        time.sleep(0.01)
        lib.stasis_critical_leave()
        time.sleep(0.01)
    print(f"DONE {failures}", flush=True)


main()
