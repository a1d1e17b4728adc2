"""`python -m activities.stop_instances HOME`: stop every local instance recorded under HOME.

The `make up` supervisor runs this as a child process when it stops, after the worker has exited, so
that it never imports the worker's code (the local backend) itself. Prints how many instance processes
were still running and got stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from activities.local import stop_recorded_instances


def main(argv: list[str]) -> int:
    """Stop the instances recorded under the state directory `argv[0]`; print their count."""
    if len(argv) != 1:
        print("usage: python -m activities.stop_instances HOME", file=sys.stderr)
        return 2
    print(stop_recorded_instances(Path(argv[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
