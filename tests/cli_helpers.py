"""Running the CLI in-process, and the one-line error convention every command keeps."""

from __future__ import annotations

import pytest

from qconvert.cli import main


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
