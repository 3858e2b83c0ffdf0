"""Run many ``nnconv`` commands cheaply: one interpreter imports torch and the CLI once,
then forks a child per command (a fresh process would pay ~2 s of imports each).

    python tests/cli_driver.py CASES.json RESULTS.json

Each case: ``argv`` (after ``nnconv``), ``out`` and ``err`` (files for the child's
stdout and stderr), and optionally ``cwd``, and ``mount`` + ``dir`` (a tmpfs mounted
on ``dir`` with those options for the command, listed and unmounted after it; run
the driver under ``unshare --mount``).  Each result: ``rc`` and, with a mount,
``left`` (what the folder holds afterwards).  The child does what interpreter
shutdown does that could print (finalizers, atexit, flushes) before exiting.
"""

import atexit
import gc
import json
import os
import subprocess
import sys


def _child(case: dict) -> None:
    from nnconv.converter.cli import main

    if "cwd" in case:
        os.chdir(case["cwd"])
    for fd, name in ((1, case["out"]), (2, case["err"])):
        new = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(new, fd)
        os.close(new)
    sys.argv = ["nnconv", *case["argv"]]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    gc.collect()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(cases: list[dict]) -> list[dict]:
    import torch  # noqa: F401  (the CLI imports it for many files: once, before forking)

    import nnconv.converter.cli  # noqa: F401

    gc.freeze()  # the children's collections then only see what the command made
    results = []
    for case in cases:
        if "mount" in case:
            command = ["mount", "-t", "tmpfs", "-o", case["mount"], "tmpfs", case["dir"]]
            subprocess.run(command, check=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(case)
        result = {"rc": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}
        if "mount" in case:
            result["left"] = sorted(os.listdir(case["dir"]))
            subprocess.run(["umount", case["dir"]], check=True)
        results.append(result)
    return results


if __name__ == "__main__":
    sys.path[0] = ""  # as for ``python -c``: the command's folder, not tests/, is importable
    with open(sys.argv[1]) as fh:
        found = run(json.load(fh))
    with open(sys.argv[2], "w") as fh:
        json.dump(found, fh)
