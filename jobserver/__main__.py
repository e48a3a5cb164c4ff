"""``python -m jobserver`` and the single-file binary's entry point.

In the binary there is no separate Python to run ``-m jobserver.child``, so the runner
starts job processes as ``jobserver _child SPEC``; that hidden command is dispatched here,
before the CLI (and its HTTP client) is imported, to keep each job's start-up short.
"""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "_child":
    from jobserver.child import main as child_main

    child_main(sys.argv[2:])
else:
    from jobserver.cli import main

    main()
