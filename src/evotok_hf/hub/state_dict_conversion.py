"""What every conversion of the authors' checkpoints shares: renaming keys by ordered rules, checking a renamed state
dict against the model it is meant for, loading it without silent gaps, and writing the output folder atomically.

Every problem found (official keys without a counterpart, our keys left missing, shape mismatches) is collected and
reported in one `CheckpointConversionError`; nothing is loaded half-way. Outputs are written to a temporary sibling
folder and renamed into place at the end, so a failure never leaves a half-written folder or clobbers an existing one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch

from .staging import check_output_dir, staged_output_dir

# An ordered rule table: the first pattern that matches a key decides; `None` drops the key.
KeyRules = list[tuple[str, "str | None"]]
# What `rename_key` returns for a key no rule matches.
UNMATCHED = object()
# The converters run from Python and from scripts/convert_official.py: their messages name both spellings.
OUTPUT_DIR_FLAGS = {"flag": "output_dir (--output-dir)", "overwrite_flag": "overwrite=True (--overwrite)"}


class CheckpointConversionError(ValueError):
    """A checkpoint does not convert; `problems` lists every issue found (all of them, not only the first)."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n{lines}")


def rename_key(key: str, rules: KeyRules):
    """The new name of `key` under the first matching rule, None when that rule drops it, or `UNMATCHED`."""
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key, count=1)
    return UNMATCHED


def count_indices(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest index captured by `pattern` among `keys` (e.g. the number of layers), 0 when none matches."""
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def expected_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of `model_class(config)`, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    sources: Mapping[str, str],
    problems: list[str],
) -> None:
    """Append to `problems` every key of `state_dict` the model lacks, every expected key left missing and every
    shape mismatch; `sources` names the official key each of ours came from (for the messages)."""
    for key, tensor in state_dict.items():
        source = sources.get(key, key)
        if key not in expected:
            problems.append(f"official key {source!r} maps to {key!r}, which the model does not have")
        elif tuple(tensor.shape) != tuple(expected[key]):
            problems.append(
                f"shape mismatch for {key!r} (from {source!r}): checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(expected[key])}"
            )
    for key in expected:
        if key not in state_dict:
            problems.append(f"model key {key!r} is missing from the checkpoint")


def load_converted(model_class, config, state_dict: dict[str, torch.Tensor], what: str, dtype=None):
    """`model_class` with `config` and the converted `state_dict`, in eval mode; any key transformers did not load
    (missing, unexpected, mismatched) raises a `CheckpointConversionError` about `what`."""
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
    )
    problems = [f"model key {k!r} was not loaded" for k in sorted(info.get("missing_keys", ()))]
    problems += [f"unexpected key {k!r}" for k in sorted(info.get("unexpected_keys", ()))]
    problems += [f"shape mismatch: {m}" for m in sorted(map(str, info.get("mismatched_keys", ())))]
    problems += [str(m) for m in info.get("error_msgs", ())]
    if problems:
        raise CheckpointConversionError(what, problems)
    return model.eval()


def check_conversion_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an existing non-empty `output_dir` unless `overwrite`, before any work is done."""
    check_output_dir(output_dir, overwrite=overwrite, **OUTPUT_DIR_FLAGS)


def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False):
    """A staging folder beside `output_dir` that replaces it once complete (see `hub.staging.staged_output_dir`)."""
    check_conversion_output_dir(output_dir, overwrite)
    return staged_output_dir(output_dir)


__all__ = [
    "CheckpointConversionError",
    "KeyRules",
    "UNMATCHED",
    "atomic_output_dir",
    "check_conversion_output_dir",
    "check_state_dict",
    "count_indices",
    "expected_shapes",
    "load_converted",
    "rename_key",
]
