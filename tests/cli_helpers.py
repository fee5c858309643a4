"""Running the CLI in-process, and the one-line error convention every command keeps."""

from __future__ import annotations

import sys

import pytest

from qconvert.cli import main

# Linux carries a process's peak RSS across fork and exec (the child's starts at the parent's high-water
# mark), so a command started straight from a pytest process that has grown to a GB would report that GB as
# its own peak: libFuzzer's -rss_limit_mb trips and memory probes measure pytest.  A small Python in between
# gives the command a fresh mark: its own child is forked from a process that never grew.
FRESH_PEAK = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"]


def run(args, capsys):
    """``qconvert ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code, err, *patterns):
    """Exit 1 and exactly one ``error: ...`` line naming each pattern; no traceback."""
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
