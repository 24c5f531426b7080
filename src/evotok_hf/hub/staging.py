"""Writing output folders so that nothing the user had is lost: everything goes to a staging folder beside the
target, which replaces the target only once complete; a failure deletes the staging folder and leaves the target as
it was."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def check_output_dir(output_dir: str | Path, overwrite: bool = False, sources: Sequence[Path] = (),
                     flag: str = "output_dir") -> Path:  # fmt: skip
    """`output_dir` resolved, refused when it is a file, a non-empty folder (unless `overwrite`), or overlaps one of
    the `sources` being read."""
    output = Path(output_dir).resolve()
    for source in sources:
        source = Path(source).resolve()
        if output == source or source in output.parents or output in source.parents:
            raise ValueError(f"{flag} {str(output)!r} overlaps the source folder {str(source)!r}; pick another folder.")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{flag} {str(output)!r} exists and is not a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{flag} {str(output)!r} exists and is not an empty folder; nothing is overwritten.")
    return output


@contextlib.contextmanager
def staged_output_dir(output_dir: str | Path | None, temp_prefix: str = "evotok-") -> Iterator[Path]:
    """Yield a staging folder to write into. With an `output_dir`, the staging folder is its sibling and replaces it
    on success (an existing folder is removed only once the new one is in place); without one, the staging folder
    is a new temporary folder and is the result. On failure the staging folder is deleted."""
    if output_dir is None:
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix))
    else:
        output_dir = Path(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield staging
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
