"""A Python that has imported torch, timm, Hydra and the project once, and forks a child for each
command line the tests run (``conftest.run_cli``): a debug run spends ~6 of its ~9 s importing.

Protocol, one line each way on stdin/stdout: a JSON request ``{"argv", "cwd", "env", "stdout",
"stderr"}`` (argv as after ``python``: ``[script, args...]`` or ``["-m", module, args...]``) is
answered by the child's pid, then by its exit status once it ends (``-N``: killed by signal N,
as ``subprocess`` reports it). The child is a fresh process in all that a command can see: its
own argv, cwd, environment (set before any of its code runs), stdin from /dev/null, stdout and
stderr to the given files, reseeded ``random`` and NumPy generators; it ends like a script does
(an uncaught exception prints its traceback and exits 1, atexit handlers run). What it shares
with its siblings is the modules already imported and ``PYTHONHASHSEED``; ``SHD_TEST_COLD=1``
runs every command in a real new interpreter instead.
"""

import importlib
import json
import os
import random
import runpy
import sys

import matplotlib
import numpy as np

# what children inherit: the imports of a training or evaluation run (~6 s on 2 cores)
for _name in ("torch", "timm", "shd_vision.cli", "shd_vision.distill", "shd_vision.engine.train",
              "shd_vision.engine.evaluate"):
    importlib.import_module(_name)
assert matplotlib.get_backend().lower() == "agg"


def run(request: dict) -> None:
    """In the child: become the command, then run it; never returns to the request loop."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        os.dup2(os.open(path, flags), fd)
    sys.stdin = open(os.devnull)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()
    np.random.seed()
    argv = request["argv"]
    if argv[0] == "-m":
        sys.path[0] = os.getcwd()
        sys.argv = argv[1:]
        if not hasattr(sys.modules.get(argv[1]), "__path__"):  # a module, not a package's __main__:
            sys.modules.pop(argv[1], None)  # run it as __main__ beside the imported copy, as `python -m` does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run(request)  # its SystemExit or exception ends the child like any script's
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    serve()
