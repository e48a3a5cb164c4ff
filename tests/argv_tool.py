"""A command-task program for the tests: reports progress, leaves an artifact, and prints
its argv (after the script name) as JSON on its last stdout line."""

import json
import os
import sys
from pathlib import Path

print("JOBSERVER_PROGRESS 0.5 half way", flush=True)
print("some text output", flush=True)
print("to stderr", file=sys.stderr, flush=True)
Path(os.environ["JOBSERVER_OUTPUT_DIR"], "argv.json").write_text(json.dumps(sys.argv[1:]))
print(json.dumps(sys.argv[1:]))
