"""Loaded only into bench/limits' part-3 gateway (its PYTHONPATH starts with this
folder): records every garbage collection of the process that takes at least
1 ms, as "pid monotonic_start duration_s generation" lines in $BENCH_GC_LOG, so a
stall of the event loop can be told from a full collection. Nothing else."""
import gc
import os
import time

_path = os.environ.get("BENCH_GC_LOG")
if _path:
    _started = [0.0]
    _out = open(_path, "a", buffering=1)

    def _on_gc(phase, info, _clock=time.monotonic):
        if phase == "start":
            _started[0] = _clock()
            return
        duration = _clock() - _started[0]
        if duration >= 0.001:
            _out.write(f"{os.getpid()} {_started[0]:.6f} {duration:.6f} {info.get('generation')}\n")

    gc.callbacks.append(_on_gc)
