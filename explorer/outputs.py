"""Where the explorer may write, and writing there atomically: a tool that deletes a user's model loses every user.

Rules, checked before any work is done:
- an export folder never is, contains or lies inside the input model, the current working directory or the home
  folder;
- an existing, non-empty export folder is replaced only with ``overwrite`` and only if a previous export wrote
  it (it holds ``plan.json`` and ``summary.json`` and no sub-folder);
- a single output file (statistics, a plan) is never written inside the input model folder and never replaces an
  existing file without ``overwrite``.
Exports are built in a hidden ``.NAME.explorer-partial-PID`` folder beside the target and renamed into place;
what is at the target is checked again at that moment (a folder that appeared meanwhile is never replaced: the
finished export is kept beside it). Leftovers of runs that were killed are tidied by the next export to the same
place: partial folders removed, a previous export set aside by a killed ``overwrite`` put back.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import ExplorerError

EXPORT_MARKERS = ("plan.json", "summary.json")
PARTIAL = ".explorer-partial-"
OLD = ".explorer-old-"


class OutputError(ExplorerError):
    """An output path is refused; the message says why in words and what to do."""


def _resolve(path: str | os.PathLike) -> Path:
    if path is None or not str(path).strip():
        raise OutputError("no output path given: name a folder or file to write")
    return Path(str(path).strip()).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _existing_source(source) -> Path | None:
    if source is None or not str(source).strip():
        return None
    p = Path(str(source)).expanduser()
    return p.resolve() if p.exists() else None


def is_export(folder: Path) -> bool:
    """Whether ``folder`` looks like something ``export`` wrote (its marker files, no sub-folder)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    names = {e.name for e in entries}
    return all(m in names for m in EXPORT_MARKERS) and not any(e.is_dir() for e in entries)


def _check_parent_writable(out: Path) -> None:
    anc = out.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot create {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {anc}: no permission; choose a folder you can write to")


def check_export_dir(out_dir, source=None, overwrite: bool = False) -> Path:
    """The resolved export folder, or OutputError naming the rule it breaks. Nothing is written, except that a
    previous export which a killed run had set aside is put back first (see ``clean_leftovers``)."""
    out = _resolve(out_dir)
    src = _existing_source(source)
    if src is not None:
        if _inside(src, out):
            what = "is" if out == src else "contains"
            raise OutputError(f"{out} {what} the input model ({src}); exporting there could destroy it. "
                              "Choose a new folder outside the model.")
        if _inside(out, src):
            raise OutputError(f"{out} lies inside the input model folder ({src}); choose a folder outside it")
    for name, protected in (("the current working directory", Path.cwd().resolve()),
                            ("your home folder", Path.home().resolve())):
        if _inside(protected, out):
            raise OutputError(f"{out} is or contains {name} ({protected}); choose a new, dedicated folder")
    clean_leftovers(out)
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out} is a file, not a folder; choose a folder name")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputError(f"{out} exists and is not empty; choose another folder, or allow overwriting "
                                  "a previous export (overwrite / --overwrite)")
            if not is_export(out):
                raise OutputError(f"{out} was not written by an export (it lacks plan.json and summary.json, or "
                                  "holds sub-folders): overwrite only replaces a previous export. Choose another "
                                  "folder.")
    _check_parent_writable(out)
    return out


def check_output_file(path, source=None, overwrite: bool = False) -> Path:
    """The resolved path of a single output file (statistics, a plan), or OutputError. Nothing is written."""
    out = _resolve(path)
    src = _existing_source(source)
    if src is not None and src.is_dir() and _inside(out, src):
        raise OutputError(f"{out} is inside the input model folder ({src}); write it somewhere else")
    if out.exists():
        if out.is_dir():
            raise OutputError(f"{out} is a folder; give a file name")
        if not overwrite:
            raise OutputError(f"{out} exists; choose another name or pass --overwrite to replace it")
    _check_parent_writable(out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> list[Path]:
    """Tidy what killed exports to ``out`` left beside it (their process is gone): partial folders are removed;
    a previous export set aside by an ``overwrite`` killed between its two renames is put back where it was when
    nothing took its place (it may be the only copy), and removed only when a newer export is in place."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in sorted(out.parent.glob(f".{out.name}.explorer-*")):
        tail = p.name[len(out.name) + 1:]
        if not tail.startswith((PARTIAL, OLD)):
            continue
        try:
            pid = int(tail.split("-")[2])
        except (IndexError, ValueError):
            continue
        if _pid_alive(pid) or not p.is_dir():
            continue
        if tail.startswith(OLD):
            if not out.exists():
                p.rename(out)  # restored: the kill came after setting it aside, before the new one moved in
                continue
            if not (is_export(p) and is_export(out)):
                continue  # not ours to delete
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def new_partial_dir(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` with the permissions of a normal folder (umask, not 0700)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    return tmp


def _appeared(out: Path, tmp: Path) -> OutputError:
    """The export is finished but ``out`` changed under it: keep both, say where the export is."""
    keep = out.parent / f"{out.name}.explorer-export-{uuid.uuid4().hex[:6]}"
    tmp.rename(keep)
    return OutputError(f"{out} was created or changed by someone else while the export was being written; it was "
                       f"left as it is, and the finished export is in {keep}")


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it: another thread could create a file
    in between with no mask at all)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def umask_modes(folder: Path) -> None:
    """Every file and folder under ``folder`` gets the modes the umask gives a new one (some writers, safetensors'
    among them, create files 0600: other users and serving containers could not read the export)."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):  # links are not followed, and left as they are
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def commit_dir(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Move a finished ``tmp`` into place. What is at ``out`` now is checked again (another process or the user
    may have put something there while the export ran): only an empty folder or, with ``overwrite``, a previous
    export is replaced; the replaced export is deleted only after the new one is in place. Modes follow the umask."""
    umask_modes(tmp)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise _appeared(out, tmp)
    if out.exists() and any(out.iterdir()):
        if not (overwrite and is_export(out)):
            raise _appeared(out, tmp)
        old = out.parent / f".{out.name}{OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        if not is_export(old):  # swapped between the check and the rename: put it back untouched
            old.rename(out)
            raise _appeared(out, tmp)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        tmp.rename(out)  # replaces at most an empty folder; a folder that filled meanwhile makes rename fail
    except OSError as err:
        if out.exists():
            raise _appeared(out, tmp) from err
        raise


@contextmanager
def staged_dir(out: Path, overwrite: bool = False):
    """Build a folder all or nothing: yields a fresh partial folder beside ``out`` (leftovers of killed runs
    tidied first); on success it replaces ``out`` as a whole, on any failure it is deleted and ``out`` untouched."""
    clean_leftovers(out)
    tmp = new_partial_dir(out)
    try:
        yield tmp
        commit_dir(tmp, out, overwrite)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file all or nothing: to a temporary name beside it, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
