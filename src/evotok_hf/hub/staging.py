"""Writing output folders so that nothing the user had is lost: everything goes to a staging folder beside the
target, which replaces the target only once complete; a failure deletes the staging folder and leaves the target as
it was. The finished folder gets the permissions the user's umask gives any new folder and file, not the private ones
of a temporary folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def check_output_dir(output_dir: str | Path, overwrite: bool = False, sources: Sequence[Path] = (),
                     flag: str = "output_dir", overwrite_flag: str | None = None) -> Path:  # fmt: skip
    """`output_dir` resolved, refused when it is a file, a non-empty folder (unless `overwrite`), or overlaps one of
    the `sources` being read. `flag` / `overwrite_flag` name the two settings in the messages, as the caller's user
    spells them."""
    output = Path(output_dir).resolve()
    for source in sources:
        source = Path(source).resolve()
        if output == source or source in output.parents or output in source.parents:
            raise ValueError(f"{flag} {str(output)!r} overlaps the source folder {str(source)!r}; pick another folder.")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{flag} {str(output)!r} exists and is not a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        hint = f" (pass {overwrite_flag} to replace it)" if overwrite_flag else ""
        raise ValueError(f"{flag} {str(output)!r} exists and is not an empty folder; nothing is overwritten{hint}.")
    return output


def _umask_folder_mode(parent: Path) -> int:
    """The mode the process umask gives a new folder, found by making one in `parent` (`os.umask` can only be read by
    setting it, which would race with other threads creating files)."""
    probe = parent / ".umask-probe"
    probe.mkdir(mode=0o777)
    try:
        return stat.S_IMODE(probe.stat().st_mode) & 0o777
    finally:
        probe.rmdir()


def _apply_umask_permissions(root: Path, folder_mode: int) -> None:
    """Give `root` and everything in it what the umask gives new folders and files: `mkdtemp` makes the staging folder
    owner-only, and some writers (safetensors) create files 0600, which would keep the output from other users."""
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode) or mode & 0o111:  # folders and executables: execute bits as the umask allows them
            os.chmod(path, folder_mode)
        else:
            os.chmod(path, folder_mode & 0o666)


@contextlib.contextmanager
def staged_output_dir(output_dir: str | Path | None, temp_prefix: str = "evotok-") -> Iterator[Path]:
    """Yield a staging folder to write into. With an `output_dir`, the staging folder is its sibling and replaces it
    on success (an existing folder is removed only once the new one is in place); without one, the staging folder
    is a new temporary folder and is the result. On failure the staging folder is deleted. On success the result and
    everything in it get the permissions the umask gives new folders and files."""
    if output_dir is None:
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix))
    else:
        output_dir = Path(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        folder_mode = _umask_folder_mode(staging)  # probed while the staging folder is still empty
        yield staging
        _apply_umask_permissions(staging, folder_mode)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output_dir is None:
        return
    old = staging.with_name(staging.name.replace(".tmp-", ".old-", 1))
    if output_dir.exists():
        output_dir.rename(old)
    try:
        staging.rename(output_dir)
    except BaseException:
        if old.exists():
            old.rename(output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["check_output_dir", "staged_output_dir"]
