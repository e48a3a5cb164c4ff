"""``python -m jobserver`` and the single-file binary's entry point.

In the binary there is no separate Python to run ``-m jobserver.child``, so the runner
starts job processes as ``jobserver _child SPEC`` and the fork server as ``jobserver
_forkserver MODULE...``; those hidden commands are dispatched here, before the CLI (and
its HTTP client) is imported, to keep their start-up short and their memory small.
Likewise a task's ``multiprocessing`` helpers started with the "spawn" or "forkserver"
method re-run the binary (workers with ``--multiprocessing-fork``, the resource tracker
and fork server with ``-c CODE``); ``freeze_support`` runs them.
"""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "_child":
    from jobserver.child import main as child_main

    child_main(sys.argv[2:])
elif len(sys.argv) > 1 and sys.argv[1] == "_forkserver":
    from jobserver.forkserver import main as forkserver_main

    forkserver_main(sys.argv[2:])
elif "--multiprocessing-fork" in sys.argv or sys.argv[-2:-1] == ["-c"]:
    import multiprocessing

    multiprocessing.freeze_support()
else:
    from jobserver.cli import main

    main()
