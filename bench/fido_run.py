"""Run ``twistd`` with bench-only instruments, kept out of the daemon's code.

    python bench/fido_run.py [twistd arguments...]

Environment:

``FIDO_STALL_FILE=PATH``
    a reactor stall probe: a timer every ``FIDO_STALL_INTERVAL`` seconds
    (default 0.02) records how late it fires; at shutdown the largest
    lateness, the count of stalls over 100 ms and the probe count are
    written to PATH as JSON, with the longest pause of Python's cyclic
    garbage collector (``gc_max_ms``).  A late timer means the reactor thread was busy
    (or the process was not scheduled) that long: every connection waited.
    ``cpu_max_ms`` is the most CPU (user + sys) the reactor thread used between two
    probes: the stall the daemon itself caused, which a loaded machine's
    scheduling does not inflate.
``FIDO_STALL_STACKS=1``
    with the probe: a thread samples the reactor thread's stack every 5 ms
    while the probe is over 50 ms late, and the stall file gets the most
    frequent stacks (``late_stacks``): what a long turn was doing.
``FIDO_GC_FREEZE=1``
    ``gc.freeze()`` once the reactor runs (an experiment).
``FIDO_CODE=DIR``
    import ``fido_tx`` from the checkout ``DIR`` (say a ``git worktree`` of
    an older commit) to measure before and after with the same harness.
``FIDO_MODULES_FILE=PATH``
    write the names of every imported module (``sys.modules``) to PATH,
    one a line, once the daemon has run for ``FIDO_MODULES_AFTER`` seconds
    (default 1): what start-up imported for the configured features.
``FIDO_TRACEMALLOC=PATH``
    with ``PYTHONTRACEMALLOC=1`` (tracing from the first import): at
    shutdown, before anything is stopped, the live Python allocations per
    source line (top 200) and per file are written to PATH as JSON: what
    the memory of an idle daemon is made of.
``FIDO_MALLOC_TRIM=1``
    ``malloc_trim(0)`` every second (an experiment: how much of the RSS is
    memory glibc keeps after ``free``).
``FIDO_GC_THRESHOLD=A,B,C``
    ``gc.set_threshold(A, B, C)`` once the reactor runs, instead of
    ``tap.py``'s (an experiment; the stall
    file's ``gc_total_ms`` and ``gc_runs`` say what the collector cost once
    the reactor runs, ``gc_startup_ms`` before).
``FIDO_PROFILE=PATH``
    run the whole daemon under cProfile and dump the stats to PATH at exit
    (``{pid}`` in PATH is replaced by the daemon's process id).
"""

import json
import os
import sys
import time


def _install_probe(reactor, path, interval):
    import gc

    state = {"max_ms": 0.0, "over_100ms": 0, "probes": 0, "worst_at_s": None,
             "gc_max_ms": 0.0, "gc_max_generation": None, "gc_over_50ms": 0,
             "gc_total_ms": 0.0, "gc_runs": [0, 0, 0], "gc_startup_ms": 0.0}
    running = []
    t0 = time.monotonic()
    gc_start = [0.0]
    state["cpu_max_ms"] = 0.0
    last = {"cpu": None, "due": None}

    def on_gc(phase, info):  # how long the cyclic garbage collector ran
        if phase == "start":
            gc_start[0] = time.monotonic()
            return
        ms = (time.monotonic() - gc_start[0]) * 1000.0
        if ms > 50.0:
            state["gc_over_50ms"] += 1
        if ms > state["gc_max_ms"]:
            state["gc_max_ms"] = round(ms, 1)
            state["gc_max_generation"] = info.get("generation")
        if not running:  # imports and tap.py's gc.collect() before gc.freeze()
            state["gc_startup_ms"] += ms
            return
        state["gc_total_ms"] += ms  # the collector's share once the reactor runs
        state["gc_runs"][info.get("generation", 0)] += 1

    gc.callbacks.append(on_gc)

    def tick(expected):
        now = time.monotonic()
        late = (now - expected) * 1000.0
        cpu = time.thread_time()  # the reactor thread's
        state["cpu_max_ms"] = max(state["cpu_max_ms"], round((cpu - last["cpu"]) * 1000.0, 1))
        last["cpu"] = cpu
        last["due"] = now + interval
        state["probes"] += 1
        if late > state["max_ms"]:
            state["max_ms"] = late
            state["worst_at_s"] = round(now - t0, 3)
        if late > 100.0:
            state["over_100ms"] += 1
        reactor.callLater(interval, tick, time.monotonic() + interval)

    stacks = None
    if os.environ.get("FIDO_STALL_STACKS"):
        stacks = _sample_late_stacks(last)

    def dump():
        state["max_ms"] = round(state["max_ms"], 1)
        if stacks is not None:
            state["late_stacks"] = stacks.most_common(25)
        state["gc_total_ms"] = round(state["gc_total_ms"], 1)
        state["gc_startup_ms"] = round(state["gc_startup_ms"], 1)
        if os.environ.get("FIDO_GC_TYPES"):  # what the collector has to walk
            import collections

            objs = gc.get_objects()
            state["gc_tracked"] = len(objs)
            state["gc_types"] = collections.Counter(
                type(o).__qualname__ for o in objs).most_common(40)
            del objs
        # cumulative collections and objects found unreachable (in cycles),
        # per generation: what the sessions leave for the collector
        state["gc_stats"] = gc.get_stats()
        times = os.times()  # user vs kernel: how much is Python, how much syscalls
        state["cpu_user_s"], state["cpu_sys_s"] = round(times.user, 3), round(times.system, 3)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    # the first probe is scheduled once the reactor runs: twistd's start-up
    # before that (imports, makeService) is not a stall of the event loop
    def first():
        running.append(True)
        last["cpu"] = time.thread_time()
        reactor.callLater(interval, tick, time.monotonic() + interval)

    reactor.callWhenRunning(first)
    reactor.addSystemEventTrigger("before", "shutdown", dump)


def _sample_late_stacks(last):
    """A daemon thread: while the probe due at ``last["due"]`` is over 50 ms
    late, count the reactor thread's innermost frames every 5 ms."""
    import collections
    import threading

    main = threading.main_thread().ident
    counts = collections.Counter()

    def where(frame):
        out = []
        while frame is not None and len(out) < 8:
            code = frame.f_code
            out.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
            frame = frame.f_back
        return " < ".join(out)

    def run():
        while True:
            time.sleep(0.005)
            due = last["due"]
            if due is None or time.monotonic() - due < 0.05:
                continue
            frame = sys._current_frames().get(main)
            if frame is not None:
                counts[where(frame)] += 1

    threading.Thread(target=run, daemon=True, name="stall-stacks").start()
    return counts


def _census(path):
    import tracemalloc

    if not tracemalloc.is_tracing():
        return
    snapshot = tracemalloc.take_snapshot()
    by = {}
    for kind in ("lineno", "filename"):
        by[kind] = [[str(s.traceback[0]), s.size, s.count]
                    for s in snapshot.statistics(kind)[:200]]
    by["total"] = sum(s.size for s in snapshot.statistics("filename"))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(by, f)


def main():
    code = os.environ.get("FIDO_CODE")
    if code:  # before/after runs: the daemon imports fido_tx from this checkout
        sys.path.insert(0, code)
    # as twistd's own start-up does it through fido's makeService: the reactor
    # without pyOpenSSL (a checkout from before that imports it plainly, or
    # from before fido_tx.private, such as 25d878a)
    try:
        from fido_tx import private
    except ImportError:
        private = None
    if hasattr(private, "import_twisted"):
        private.import_twisted()
    from twisted.internet import reactor  # the default (epoll) reactor
    from twisted.scripts.twistd import run

    if os.environ.get("FIDO_GC_FREEZE"):  # experiment: no GC scans of start-up objects
        import gc

        reactor.callWhenRunning(gc.freeze)
    threshold = os.environ.get("FIDO_GC_THRESHOLD")
    if threshold:  # experiment: e.g. "700,10,10" (CPython's default)
        import gc

        # once running: after tap.py's own setting
        reactor.callWhenRunning(gc.set_threshold, *(int(n) for n in threshold.split(",")))
    path = os.environ.get("FIDO_STALL_FILE")
    if path:
        _install_probe(reactor, path, float(os.environ.get("FIDO_STALL_INTERVAL", "0.02")))
    modules = os.environ.get("FIDO_MODULES_FILE")
    if modules:
        def dump_modules():
            with open(modules, "w", encoding="utf-8") as f:
                f.write("".join(name + "\n" for name in sorted(sys.modules)))

        after = float(os.environ.get("FIDO_MODULES_AFTER", "1"))
        reactor.callWhenRunning(lambda: reactor.callLater(after, dump_modules))
    if os.environ.get("FIDO_MALLOC_TRIM"):  # experiment: what free() keeps from the OS
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim

        def every_second():
            trim(0)
            reactor.callLater(1.0, every_second)

        reactor.callWhenRunning(every_second)
    census = os.environ.get("FIDO_TRACEMALLOC")
    if census:
        reactor.addSystemEventTrigger("before", "shutdown", _census, census)
    sys.argv = ["twistd"] + sys.argv[1:]
    profile = os.environ.get("FIDO_PROFILE", "").replace("{pid}", str(os.getpid()))
    if not profile:
        return run()
    import cProfile

    prof = cProfile.Profile()
    # twistd may leave through os._exit: dump when the reactor has stopped
    reactor.addSystemEventTrigger("after", "shutdown", lambda: (prof.disable(),
                                                                 prof.dump_stats(profile)))
    prof.enable()
    return run()


if __name__ == "__main__":
    sys.exit(main())
