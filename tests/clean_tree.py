"""`make test` leaves the checkout as it found it: ``git status`` is compared before and after.

    python -m pytest -q      # a test that writes into the checkout turns the run's exit status to 1

Loaded by conftest.py (its two hooks). Outside a git checkout (an unpacked source archive, tests
run from an installed copy) there is nothing to compare and the check is skipped. Test output
belongs in pytest's ``tmp_path``. A file that was already modified before the run is compared by
its status line only, as ``git status --porcelain`` shows it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

STATUS_BEFORE = pytest.StashKey["list[str] | None"]()


def git_status(root: Path) -> list[str] | None:
    """``git status --porcelain`` lines of the checkout whose top folder is ``root``, else None."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True,
                             text=True, timeout=60)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(root).resolve():
            return None  # not a checkout, or the project sits inside some other repository
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no git here
    return status.stdout.splitlines() if status.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[STATUS_BEFORE] = git_status(session.config.rootpath)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.stash.get(STATUS_BEFORE, None)
    if before is None or exitstatus == pytest.ExitCode.INTERRUPTED:
        return
    after = git_status(session.config.rootpath) or []
    changes = [f"  + {line}" for line in after if line not in before] + \
              [f"  - {line}" for line in before if line not in after]
    if not changes:
        return
    title = "FAILED: the test-suite changed the checkout"
    body = "git status --porcelain, + new, - gone (write test output under tmp_path):\n" + "\n".join(changes)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")  # end the progress line
        reporter.write_sep("=", title, red=True, bold=True)
        reporter.write_line(body)
    else:
        print(f"{title}\n{body}", file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
