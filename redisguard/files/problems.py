"""One-line answers to "can redisguard open this file?", naming the path, the problem and the fix."""

from __future__ import annotations

import os
from pathlib import Path


def file_problem(path: Path, what: str) -> str | None:
    """None if ``path`` is a regular file this process can read; else one line such as
    ``certificate not found: /etc/x.pem`` or ``/etc/x.key: permission denied (owner uid 0, mode 0600; ...)``.

    ``what`` names the file's role ("certificate", "key", "client CA", "users file")."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        missing = _missing_dir(path)
        return f"{what} not found: {path}" + (f" (directory {missing} does not exist)" if missing else "")
    except PermissionError:
        return f"{path}: permission denied ({access_hint(path)})"
    except IsADirectoryError:
        return f"{path}: is a directory, not a {what} file"
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if not path.is_file():
        return f"{path}: not a regular file (the {what} must be a file)"
    return None


def access_hint(path: Path) -> str:
    """Who may read ``path`` and who is asking: ``owner uid 0, mode 0600; redisguard runs as uid 10001: ...``."""
    uid = os.geteuid()
    try:
        st = os.stat(path)
    except PermissionError:
        return f"a directory above it is not searchable by uid {uid}, which redisguard runs as"
    except OSError as e:
        return e.strerror or str(e)
    return (f"owner uid {st.st_uid}, group {st.st_gid}, mode {st.st_mode & 0o7777:04o}; redisguard runs as uid {uid}: "
            f"make it readable by that uid (chown {uid} or a shared group with mode 0640)")  # fmt: skip


def _missing_dir(path: Path) -> Path | None:
    """The highest directory above ``path`` that does not exist, if any."""
    missing = None
    for parent in path.parents:
        if parent.exists():
            break
        missing = parent
    return missing
