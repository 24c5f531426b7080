"""Editing a text tokenizer's added tokens for a converted MLLM: the authors' image start / end tokens become ours.

The authors' generation model wraps images in `<im_start>` / `<im_end>`, which their code finds by id (their position
at the end of the embeddings), not by string. A converted model names them by config id and by the tokens of its
saved text tokenizer, so the tokens at those ids are renamed (or, for a tokenizer saved before the trainer added them,
appended). The tokenizers library can add tokens but not rename them, so renaming edits the saved `tokenizer.json`
and `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

# The authors' image start / end tokens (llava.constants); their code finds them by id (see `official_boi_eoi_ids`).
OFFICIAL_IMAGE_START_END_TOKENS = ("<im_start>", "<im_end>")


def official_boi_eoi_ids(llava_config: dict, vocab_rows: int) -> tuple[int, int]:
    """The ids of the authors' image start / end tokens. Their code finds them by position from the end of the
    embeddings (llava_qwen.py): the trainer appends `<im_start>`, `<im_end>` last (and, with `mm_use_vi_start_end`,
    the video start / end after them), so they are rows -2 / -1, or -4 / -3."""
    first = vocab_rows - (4 if llava_config.get("mm_use_vi_start_end") else 2)
    return first, first + 1


def rename_added_tokens(tokenizer, renames: Mapping[int, str]):
    """A copy of a fast tokenizer in which the added tokens at the ids of `renames` carry the new strings (same ids,
    same flags). Done on the saved files: the tokenizers library can add tokens but not rename them."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError("renaming tokens needs a fast tokenizer (one saved with a tokenizer.json)")
        state = json.loads(path.read_text(encoding="utf-8"))
        old_to_new = {}
        for entry in state.get("added_tokens", []):
            if entry["id"] in renames:
                old_to_new[entry["content"]] = renames[entry["id"]]
                entry["content"] = renames[entry["id"]]
        if len(old_to_new) != len(renames):
            raise ValueError(f"the ids {sorted(renames)} are not all added tokens of the text tokenizer")
        path.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")

        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            for key, entry in (config.get("added_tokens_decoder") or {}).items():
                if int(key) in renames:
                    entry["content"] = renames[int(key)]

            def renamed(token):
                if isinstance(token, dict) and token.get("content") in old_to_new:
                    return {**token, "content": old_to_new[token["content"]]}
                return old_to_new.get(token, token) if isinstance(token, str) else token

            for name in ("additional_special_tokens", "extra_special_tokens"):
                value = config.get(name)
                if isinstance(value, list):
                    config[name] = [renamed(t) for t in value]
                elif isinstance(value, dict):
                    config[name] = {k: renamed(t) for k, t in value.items()}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)


def install_boi_eoi(text_tokenizer, ids: tuple[int, int], vocab_rows: int, tokens: tuple[str, str], problems: list):
    """The text tokenizer with `tokens` (ours, e.g. `<boi>` / `<eoi>`) at the official image start / end `ids`: the
    authors' `<im_start>` / `<im_end>` there are renamed; a tokenizer that stops right before `ids` (one saved
    before the trainer added them) gets them appended. Anything else is a tokenizer that does not match."""
    present = [text_tokenizer.convert_ids_to_tokens(i) if i < len(text_tokenizer) else None for i in ids]
    if present == list(tokens):
        return text_tokenizer
    vocab = text_tokenizer.get_vocab()
    elsewhere = [t for t, i in zip(tokens, ids) if t in vocab and vocab[t] != i]
    if elsewhere:
        problems.append(
            f"the text tokenizer already has {elsewhere} at other ids than the official image start / end {list(ids)}"
        )
        return text_tokenizer
    if present == list(OFFICIAL_IMAGE_START_END_TOKENS):
        logger.info("Renaming the authors' image tokens %s (ids %s) to %s.", present, list(ids), list(tokens))
        try:
            return rename_added_tokens(text_tokenizer, dict(zip(ids, tokens)))
        except ValueError as err:
            problems.append(f"cannot rename the text tokenizer's {present} to {list(tokens)}: {err}")
            return text_tokenizer
    if len(text_tokenizer) == ids[0] and ids[1] == vocab_rows - 1:
        text_tokenizer.add_tokens(list(tokens), special_tokens=True)
        return text_tokenizer
    problems.append(
        f"the text tokenizer ({len(text_tokenizer)} tokens) does not match the checkpoint's image start / end rows "
        f"{list(ids)} (of {vocab_rows}): it has {present} there, not the authors' "
        f"{list(OFFICIAL_IMAGE_START_END_TOKENS)}; give the tokenizer saved with the checkpoint"
    )
    return text_tokenizer


__all__ = ["OFFICIAL_IMAGE_START_END_TOKENS", "install_boi_eoi", "official_boi_eoi_ids", "rename_added_tokens"]
