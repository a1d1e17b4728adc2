"""The echo example, with a first line of output the CLI's `logs` test looks for."""

import runpy
from pathlib import Path

print("hello from the instance", flush=True)
ECHO = Path(__file__).resolve().parents[2] / "examples" / "echo" / "server.py"
runpy.run_path(str(ECHO), run_name="__main__")
