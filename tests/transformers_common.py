"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), taken from the transformers sdist that
matches the installed version, so our classes are checked by the same client code transformers checks its models
with (imported by name from the test modules: pytest puts tests/ on sys.path).

The sdist is fetched from the package registry with pip at test time, never committed: it is cached under
`$XDG_CACHE_HOME/evotok_hf` (by default `~/.cache/evotok_hf`), outside the repository. Only the two common-test files
are extracted, into a package of their own; the sdist lacks three helper modules they import, which get small stubs
written here (what each stands in for is said below).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_sdist_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")

# The helper modules that the common-test files import but the sdist does not ship.
STUBS = {
    # The export tests live beside the mixin in the transformers repository only: none are run here.
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # Likewise GenerationTesterMixin (tests/generation/test_utils.py): an empty stand-in, so only the modeling mixin
    # runs. `test_generation_tester_mixin_inheritance` is therefore skipped by the test module, with that reason.
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # `ConfigTester.check_config_arguments_init` builds a config from these generic `PreTrainedConfig` arguments
    # (all non-default values) and checks that each one is kept.
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "tie_word_embeddings": False,\n'
        '    "is_decoder": True,\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        '    "pad_token_id": 2,\n'
        '    "bos_token_id": 3,\n'
        '    "eos_token_id": 4,\n'
        "}\n"
    ),
}


class CommonTestsUnavailable(RuntimeError):
    """The sdist could not be fetched or read; the message says why (the test module skips with it)."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evotok_hf"


def _download_sdist(version: str, folder: Path) -> Path:
    """The sdist in `folder`, downloaded by pip into a staging folder first, so that a concurrent run never reads a
    half-written archive."""
    sdist = folder / f"transformers-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as staging:
        command = [
            sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:", "--no-deps",
            "--disable-pip-version-check", "--quiet", "--timeout", "30", "-d", staging,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise CommonTestsUnavailable(f"`pip download transformers=={version}` (sdist) timed out") from None
        downloaded = Path(staging) / sdist.name
        if result.returncode != 0 or not downloaded.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise CommonTestsUnavailable(f"the transformers {version} sdist could not be downloaded with pip: {last}")
        downloaded.replace(sdist)
    return sdist


def _extract(sdist: Path, version: str, target: Path) -> None:
    """Write the package `target/PACKAGE` (the two common-test files + the stubs) atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        package = staging / PACKAGE
        package.mkdir()
        with tarfile.open(sdist) as archive:
            for filename in COMMON_FILES:
                member = f"transformers-{version}/tests/{filename}"
                try:
                    source = archive.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    raise CommonTestsUnavailable(f"the transformers {version} sdist has no {member}")
                (package / filename).write_bytes(source.read())
        # The package's __init__ stays empty: `test_configuration_common` executes it once more as a module.
        (package / "__init__.py").write_text("")
        for relative, text in STUBS.items():
            path = package / relative
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").write_text("")
            path.write_text(text)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / PACKAGE).is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_common_tests():
    """`(test_modeling_common, test_configuration_common)` of the installed transformers version's sdist. Raises
    `CommonTestsUnavailable` with the reason when they cannot be had."""
    version = transformers.__version__
    target = cache_root() / f"transformers-{version}-common-tests"
    if not (target / PACKAGE).is_dir():
        sdist = _download_sdist(version, cache_root() / "sdists")
        _extract(sdist, version, target)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    try:
        modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
        configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    except ImportError as error:
        raise CommonTestsUnavailable(f"transformers' common tests do not import here: {error}") from None
    return modeling, configuration
