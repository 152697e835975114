"""Write docs/cli.md from each command's ``--help``, as installed: ``python -m tools.cli_doc``.

The hand-written head of the page (everything before the first ``## ``) is kept; each section below it is
the help of one command, so the page cannot drift from the tools.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PAGE = Path("docs/cli.md")
COMMANDS = [
    ["ts-archive"], *[["ts-archive", c] for c in ("init", "train", "build", "verify", "keygen", "sign", "tune", "kserve", "ray", "triton")],
    ["ts-server"], *[["ts-server", c] for c in ("start", "stop", "info")],
    ["ts-manage"], *[["ts-manage", c] for c in ("register", "rollout", "scale", "unregister", "describe", "set-default")],
    ["ts-explain"], ["ts-gpu-check"], ["python", "-m", "serveready.kserve"],
]


def help_of(command: list[str]) -> str:
    binary = Path(sys.executable).parent
    argv = [sys.executable, *command[1:]] if command[0] == "python" else [str(binary / command[0]), *command[1:]]
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "110"}, check=True)
    return done.stdout.rstrip()


def main() -> int:
    head = PAGE.read_text().split("\n## ", 1)[0].rstrip() + "\n"
    sections = [f"\n## `{' '.join(c)}`\n\n```\n{help_of(c)}\n```\n" for c in COMMANDS]
    PAGE.write_text(head + "".join(sections))
    print(f"wrote {PAGE}: {len(sections)} commands", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
