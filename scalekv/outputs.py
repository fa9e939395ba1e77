"""Where commands write. Every command checks its output paths with :func:`check_output_folder` or
:func:`check_output_file` before it loads a model, so that a path it cannot or must not write fails at once, in one
line, instead of after the work.

Refused: an empty path, a folder path that is a file (or a file path that is a folder), a path under a file, a place
that cannot be written, and an existing output this command did not write: a non-empty folder, or a file, unless the
command's ``owned`` test says it is one of its own earlier outputs (which the command then replaces or resumes).

:func:`replace_output` writes a folder output in place of an earlier one of the same command without ever mixing
the two: the earlier files go first (the file that marks an output complete first of all), then the new files,
each atomically, the marker last. An interrupted write leaves no half-written file and no marker, so the next run
refuses the folder rather than taking the leftovers for a finished output.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes


class OutputError(ValueError):
    """An output path a command cannot or must not write."""


def _name(flag: str, path: Any) -> str:
    return f"{flag} {str(path)!r}"


def _is_temporary(entry: Path) -> bool:
    """A temporary file :mod:`scalekv.atomic` or the write check left behind when killed (``.name.XXXX.tmp``)."""
    return entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.startswith(".scalekv-probe-"))


def _writable(folder: Path, flag: str, path: Any) -> None:
    """Create and remove a file in ``folder``: the only test of writing that permissions, read-only mounts and
    quotas all answer truthfully."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".scalekv-probe-")
    except OSError as e:
        raise OutputError(
            f"{_name(flag, path)}: cannot write in {str(folder)!r} ({e.strerror or e}); expected a writable place"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _checked_path(path: Any, flag: str) -> tuple[Path, Path]:
    """``path`` as a Path and its nearest existing folder (itself, if it exists); refuses empty paths and paths
    under a file."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise OutputError(f"{_name(flag, path)}: expected a path")
    p = Path(path)
    for ancestor in p.parents:
        if os.path.lexists(ancestor):
            if not ancestor.is_dir():
                raise OutputError(f"{_name(flag, path)} lies under {str(ancestor)!r}, which is a file, not a folder")
            return p, ancestor
    return p, Path(".")


def check_output_folder(
    path: Any,
    *,
    flag: str = "--out",
    owned: Callable[[Path], bool] | None = None,
    expected: str = "a new or empty folder",
) -> Path:
    """Check that the folder ``path`` may be written: new (its parents are created), empty, or non-empty and
    ``owned(path)`` (an earlier output of the command). ``expected`` says what is accepted, for the error."""
    p, parent = _checked_path(path, flag)
    if os.path.lexists(p):
        if not p.is_dir():
            raise OutputError(f"{_name(flag, path)} is a file: expected {expected}")
        others = sorted(e.name for e in p.iterdir() if not _is_temporary(e))
        if others and not (owned is not None and owned(p)):
            shown = ", ".join(map(repr, others[:3])) + (", ..." if len(others) > 3 else "")
            raise OutputError(
                f"{_name(flag, path)} is a non-empty folder this command did not write (it holds {shown}): "
                f"expected {expected}"
            )
        _writable(p, flag, path)
    else:
        _writable(parent, flag, path)
    return p


def check_output_file(
    path: Any,
    *,
    flag: str = "--out",
    owned: Callable[[Path], bool] | None = None,
    expected: str = "a new file name",
    parent_must_exist: bool = False,
) -> Path:
    """Check that the file ``path`` may be written: new, or an existing file that ``owned(path)`` accepts (one the
    command documents that it replaces). With ``parent_must_exist`` its folder must exist already (else parents
    are created when writing)."""
    p, parent = _checked_path(path, flag)
    if parent_must_exist and not p.parent.is_dir():
        raise OutputError(f"{_name(flag, path)}: the folder {str(p.parent)!r} does not exist")
    if os.path.lexists(p):
        if p.is_dir():
            raise OutputError(f"{_name(flag, path)} is a folder: expected {expected}")
        if not (owned is not None and owned(p)):
            raise OutputError(f"{_name(flag, path)} exists and is not a file this command writes: expected {expected}")
        _writable(p.parent, flag, path)
    else:
        _writable(parent, flag, path)
    return p


def previous_output(folder: Path, marker: str, files: Callable[[dict], Iterable[str]]) -> list[str] | None:
    """The files of an earlier output in ``folder``, marker last, or None when ``folder`` holds anything else.

    An earlier output is a folder whose ``marker`` file is a JSON object ``data`` and whose other files are among
    ``files(data)`` (temporary leftovers of an interrupted write aside). An empty or missing folder gives []."""
    if not folder.is_dir():
        return [] if not os.path.lexists(folder) else None
    present = {e.name for e in folder.iterdir() if not _is_temporary(e)}
    if not present:
        return []
    try:
        data = json.loads((folder / marker).read_text())
        listed = {str(name) for name in files(data)} if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if listed is None or not present <= listed | {marker}:
        return None
    return [*sorted(present - {marker}), marker]


def owned_by(marker: str, files: Callable[[dict], Iterable[str]]) -> Callable[[Path], bool]:
    """The ``owned`` test of :func:`check_output_folder` for outputs that :func:`previous_output` recognises."""
    return lambda folder: previous_output(folder, marker, files) is not None


def replace_output(
    folder: Path,
    contents: Mapping[str, bytes],
    marker: str,
    files: Callable[[dict], Iterable[str]],
    *,
    flag: str = "--out",
) -> list[Path]:
    """Write ``contents`` (file name -> bytes; ``marker`` among them) into ``folder`` in place of an earlier output.

    The earlier output (see :func:`previous_output`; checked again now, in case the folder changed meanwhile) is
    removed first, marker first; then the new files are written atomically, marker last. Returns their paths."""
    if marker not in contents:
        raise ValueError(f"the output's contents lack its marker file {marker!r}")
    old = previous_output(folder, marker, files)
    if old is None:
        raise OutputError(f"{_name(flag, folder)} was changed while this command ran: it now holds other files")
    folder.mkdir(parents=True, exist_ok=True)
    for name in [marker, *(n for n in old if n != marker)]:
        (folder / name).unlink(missing_ok=True)
    written = [atomic_write_bytes(folder / name, data) for name, data in contents.items() if name != marker]
    written.append(atomic_write_bytes(folder / marker, contents[marker]))
    return written
