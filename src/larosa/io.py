"""Writing outputs so that an interrupted run never leaves a half-written file or directory behind, ``overwrite``
never removes anything larosa did not write, and a finished result is not lost when its destination fails.

Files are written to a temporary name beside their destination and renamed into place. A model directory is
staged as a whole beside its destination, checksummed (every file it holds is listed in ``larosa_checksums.json``)
and renamed into place; only a directory whose files are all listed there may be replaced. Temporary names left
by a killed process are removed by the next write beside them. Destinations are checked before the work
(:func:`check_output_file`, :func:`check_output_dir`, :func:`prepare_dir`); one that still fails at the end gets
its result kept in the cache instead (:func:`deliver`), and the error says where.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import platformdirs

from .errors import LarosaError

CHECKSUMS = "larosa_checksums.json"
_STAGING = ".larosa-staging-"  # in the name of every temporary file or directory, so stale ones can be found


class Kept(LarosaError):
    """A finished result could not be put where it was asked for and was kept elsewhere; the message says where."""


def cache_dir() -> Path:
    """larosa's cache: ``$LAROSA_CACHE``, else the platform's cache directory."""
    path = Path(os.environ.get("LAROSA_CACHE") or platformdirs.user_cache_dir("larosa"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends, removed if it fails."""
    path = Path(path)
    _remove_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_STAGING}{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON: a NaN or Inf is refused (strict parsers reject the bare ``NaN`` Python would write)."""
    try:
        text = json.dumps(obj, indent=2, default=str, allow_nan=False)
    except ValueError as e:
        raise LarosaError(f"refusing to write {path}: it would hold NaN or Inf") from e
    write_text(path, text + "\n")


def write_report(out: str | os.PathLike, stem: str, result: dict, table: str) -> None:
    """``out/stem.json`` and ``out/stem.md``: a result and its markdown table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result)
    write_text(out / f"{stem}.md", table + "\n")


def deliver(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(path)``, for a result whose work is done: if the destination fails now (it became unwritable, a file
    took its directory's place, the disk filled up), ``write`` the result into the cache instead and raise a
    :class:`Kept` error that says where it is, so the work is not lost."""
    path = Path(path)
    try:
        write(path)
    except Kept:
        raise
    except (OSError, LarosaError) as e:
        _keep(path, e, write)


def _keep(dest: Path, error: Exception, put: Callable[[Path], object]) -> NoReturn:
    """``put`` a result whose destination failed with ``error`` at a new path in the cache and raise :class:`Kept`;
    if that fails too, ``error`` is raised."""
    try:
        spare = cache_dir() / "kept" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" / dest.name
        spare.parent.mkdir(parents=True, exist_ok=True)
        put(spare)
    except (OSError, LarosaError):
        raise error from None
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    raise Kept(f"could not write {dest}: {reason}. The result was kept in {spare}; move it where you want "
               "it") from error


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail before the work, not after it, when ``path`` cannot be written: a directory in its place, or a
    parent that is missing and cannot be made, or is not writable."""
    path = Path(path)
    if path.is_dir():
        raise LarosaError(f"{path} is a directory; give a file name")
    _check_parent(path)
    return path


def _check_parent(path: Path) -> None:
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise LarosaError(f"cannot write {path}: {blocker} is a file, not a directory; choose another output path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LarosaError(f"cannot create {path.parent}: {e.strerror}") from e
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise LarosaError(f"{path.parent} is not writable; choose another output path")


def prepare_dir(out: str | os.PathLike) -> Path:
    """A directory to write several results into as they come (a resumable run), made now so that a bad path
    fails before the work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LarosaError(f"{out} exists and is not a directory; choose another output directory")
    _check_parent(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LarosaError(f"cannot create {out}: {e.strerror}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise LarosaError(f"{out} is not writable; choose another output directory")
    return out


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before the work when ``out`` cannot take a model directory: it exists (without ``overwrite``), it is
    a file, it holds anything larosa did not write, or its parent is not writable."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise LarosaError(f"{out} exists and is not a directory larosa wrote; choose another output directory")
        if not overwrite:
            raise LarosaError(f"{out} exists; choose another directory, or pass overwrite (--overwrite) to "
                              "replace a model directory larosa wrote")
        foreign = _foreign_files(out)
        if foreign:
            raise LarosaError(f"refusing to overwrite {out}: it holds {', '.join(foreign[:5])}"
                              f"{' and more' if len(foreign) > 5 else ''}, which larosa did not write (only a "
                              f"directory whose files are all listed in its {CHECKSUMS} is replaced); move them or "
                              "choose another directory")
    _check_parent(out)
    return out


def _foreign_files(directory: Path) -> list[str]:
    """What in ``directory`` is not listed in its checksums file (everything, when there is none)."""
    try:
        listed = set(json.loads((directory / CHECKSUMS).read_text()))
    except (OSError, ValueError, TypeError):
        listed = set()
    return sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                  if p.name != CHECKSUMS and (p.name not in listed or not p.is_file()))


@contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False, keep: bool = True) -> Iterator[Path]:
    """A directory to write into, beside ``out``: when the block ends every file in it is checksummed and it is
    renamed onto ``out`` (replacing a directory larosa wrote, with ``overwrite``); if the block fails it is
    removed, so ``out`` is never half-written. Staging directories left by a killed process are removed first.
    If the finished directory cannot be put in place (``out`` appeared meanwhile, the rename failed), it is moved
    into the cache and a :class:`Kept` error says where (without ``keep``, it is dropped and the error raised)."""
    out = check_output_dir(out, overwrite)
    _remove_stale(out.parent)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING}{os.getpid()}-", dir=out.parent))
    try:
        yield staged
        sums = {p.name: sha256(p) for p in sorted(staged.iterdir()) if p.is_file()}
        (staged / CHECKSUMS).write_text(json.dumps(sums, indent=2))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    try:
        _place(staged, out, overwrite)
    except (OSError, LarosaError) as e:
        if not keep:
            raise
        _keep(out, e, lambda spare: shutil.move(staged, spare))
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # still there only if it could be neither placed nor kept


def _place(staged: Path, out: Path, overwrite: bool) -> None:
    """Rename a finished staging directory onto ``out``, replacing only a directory larosa wrote."""
    if overwrite and out.exists():
        check_output_dir(out, overwrite)  # again: something may have been added meanwhile
        old = out.with_name(f".{out.name}{_STAGING}{os.getpid()}-old")
        os.replace(out, old)
        try:
            os.replace(staged, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old)
        return
    try:
        os.replace(staged, out)
    except OSError as e:
        if not out.exists():
            raise
        raise LarosaError(f"{out} appeared while larosa was writing it (another process?) and was left as it "
                          "is") from e


def _remove_stale(directory: Path) -> None:
    """Staging files and directories of processes that no longer run (killed mid-write)."""
    for p in directory.glob(f".*{_STAGING}*"):
        pid = p.name.split(_STAGING, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_checksums(path: Path) -> None:
    """Every weight file ``path``'s checksums file lists is there and unchanged (the other files are listed so
    that overwrite knows them; a hand-edited config is caught by the strict loading instead)."""
    sums = path / CHECKSUMS
    if not sums.exists():
        raise LarosaError(f"{path} has no {CHECKSUMS}; it was not written by larosa sparsify, or not completely")
    for name, want in json.loads(sums.read_text()).items():
        if not name.endswith(".safetensors"):
            continue
        file = path / name
        if not file.exists():
            raise LarosaError(f"{path}: {name} is missing")
        if sha256(file) != want:
            raise LarosaError(f"{path}: {name} is corrupted or truncated (sha256 differs from {CHECKSUMS})")
