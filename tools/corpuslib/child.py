"""Run a Python module as a child process and record its peak resident memory.

Usage: ``python child.py RSS_FILE MODULE [ARGS...]``: runs MODULE as ``python -m MODULE ARGS`` would, and at
exit writes the process's VmHWM (resident-set high-water mark, kB) to RSS_FILE. Not getrusage's
RUSAGE_CHILDREN in the parent: Linux carries the parent's high-water mark over fork/vfork + exec, so
a child started by a large parent would report at least the parent's size.
"""
from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def vm_hwm_kb() -> int:
    """This process's VmHWM in kB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    rss_file, module = sys.argv[1], sys.argv[2]
    atexit.register(lambda: Path(rss_file).write_text(str(vm_hwm_kb())))
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
