"""Where a result came from: the date and the commit of the gpulayers that made it
(the main job's JSON and the scripts' results documents record both)."""
from __future__ import annotations

import datetime
import os
import re
import subprocess

__all__ = ["today", "git_commit", "package_commit"]


def today():
    return datetime.date.today().isoformat()


def git_commit(repo_dir="."):
    """HEAD's hash; else env GPULAYERS_COMMIT; else 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    except Exception:
        pass
    return os.environ.get("GPULAYERS_COMMIT") or "unknown"


def package_commit():
    """The commit of the gpulayers that is imported, or None when unknown.

    HEAD of the checkout the package is imported from (only when that folder
    is itself a git work tree's root: an installed copy inside some other
    repository, e.g. a virtualenv in a project, must not report that
    project's commit); else env GPULAYERS_COMMIT; else None.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, ".git")):
        commit = git_commit(root)
    else:
        commit = os.environ.get("GPULAYERS_COMMIT") or "unknown"
    return None if commit == "unknown" else commit
