"""Flat remote-code export: a saved EvoTok folder that loads with `trust_remote_code=True` where `evotok_hf` is not
installed.

`modeling/` and `processing/` are written so that each file imports only its siblings (`from .x import y`) and
third-party packages every transformers user has (torch, transformers, numpy, PIL). That makes the files valid as a
flat folder: they are copied next to `config.json` (without the packages' `__init__.py`, which would clash), and
`auto_map` entries ("module.Class") tell transformers' Auto classes which file defines which class:

    config.json                                AutoConfig, AutoModel (tokenizer) or AutoModelForImageTextToText +
                                               AutoModelForCausalLM + AutoModel (VLM)
    preprocessor_config.json                   AutoImageProcessor (a tokenizer folder)
    processor_config.json                      AutoProcessor; AutoImageProcessor in its nested "image_processor"
                                               (a VLM folder: transformers 5 saves the image processor there)
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
EXPORTED_FOLDERS = ("modeling", "processing")
# Third-party packages the exported files may import: what loading any transformers model already needs.
ALLOWED_THIRD_PARTY = frozenset({"torch", "transformers", "numpy", "PIL"})

CONFIG_NAME = "config.json"
IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"


class RemoteCodeExportError(ValueError):
    """A file of `modeling/` or `processing/` cannot be exported flat (it imports outside its folder)."""


def _module_name(cls: type) -> str:
    return cls.__module__.rsplit(".", 1)[-1]


def _class_ref(cls: type) -> str:
    """How `auto_map` names a class of a flat folder: "<file stem>.<class name>"."""
    return f"{_module_name(cls)}.{cls.__name__}"


def check_flat_imports(path: Path, siblings: set[str]) -> None:
    """Raise RemoteCodeExportError when `path` imports anything but its `siblings` (relative, one level), the
    standard library and ALLOWED_THIRD_PARTY. Imports inside functions count: they run on the user's machine too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    folder = path.parent.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [(node.module, 0)]
            elif node.module is None:  # from . import x, y
                names = [(alias.name, node.level) for alias in node.names]
            else:
                names = [(node.module, node.level)]
        else:
            continue
        for name, level in names:
            where = f"{folder}/{path.name}:{node.lineno}"
            if level > 1:
                raise RemoteCodeExportError(
                    f"{where} imports {'.' * level}{name}, outside `{folder}/`; exported files may only import "
                    f"siblings (`from .module import name`)."
                )
            if level == 1:
                if name.split(".")[0] not in siblings:
                    raise RemoteCodeExportError(f"{where} imports .{name}, which is not a file of `{folder}/`.")
                continue
            top = name.split(".")[0]
            if top not in ALLOWED_THIRD_PARTY and top not in sys.stdlib_module_names:
                raise RemoteCodeExportError(
                    f"{where} imports {name!r}; exported files may import only siblings, the standard library and "
                    f"{sorted(ALLOWED_THIRD_PARTY)}, so the folder loads where `evotok_hf` is not installed."
                )


def exportable_files() -> list[Path]:
    """The files copied into an exported folder, after checking each one's imports."""
    files, seen = [], {}
    for folder in EXPORTED_FOLDERS:
        paths = sorted(p for p in (PACKAGE_DIR / folder).glob("*.py") if p.name != "__init__.py")
        siblings = {p.stem for p in paths}
        for path in paths:
            if path.name in seen:
                raise RemoteCodeExportError(
                    f"{folder}/{path.name} and {seen[path.name]}/{path.name} would land on the same file name."
                )
            seen[path.name] = folder
            check_flat_imports(path, siblings)
            files.append(path)
    return files


def _check_exported_class(cls: type, what: str) -> None:
    module = cls.__module__
    if not any(module.startswith(f"{PACKAGE_DIR.name}.{folder}.") for folder in EXPORTED_FOLDERS):
        raise ValueError(
            f"export_remote_code: the {what} class {cls.__name__} is defined in {module}, not in "
            f"`{PACKAGE_DIR.name}.modeling` / `.processing`, so its code cannot be exported."
        )


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _add_auto_map(data: dict, entries: dict[str, str]) -> dict:
    auto_map = dict(data.get("auto_map") or {})
    auto_map.update(entries)
    data["auto_map"] = auto_map
    return data


def export_remote_code(model, processor_or_image_processor, folder) -> list[Path]:
    """Make `folder` (where `model` and its processor were saved with `save_pretrained`) loadable with
    `trust_remote_code=True` without `evotok_hf`: copy the flat `modeling/` and `processing/` files and write
    `auto_map`. Returns the copied files.

    Args:
        model: the saved `EvoTokModel` (tokenizer) or `EvoTokForConditionalGeneration` (VLM).
        processor_or_image_processor: its `EvoTokImageProcessor` (tokenizer) or `EvoTokProcessor` (VLM).
        folder: the saved folder (holds `config.json` and the processor's files).
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"export_remote_code: {folder} has no {CONFIG_NAME}; save the model there first.")
    config = _read_json(config_path)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.get("model_type") != model_type:
        raise ValueError(
            f"export_remote_code: {config_path} describes model_type {config.get('model_type')!r}, but the model "
            f"given is {model_type!r}."
        )
    processor = processor_or_image_processor
    if hasattr(processor, "image_processor"):  # a multimodal processor
        image_processor = processor.image_processor
    else:
        image_processor, processor = processor, None
    for obj, what in ((model, "model"), (model.config, "config"), (image_processor, "image processor")):
        _check_exported_class(type(obj), what)
    if processor is not None:
        _check_exported_class(type(processor), "processor")

    files = exportable_files()
    copied = []
    for path in files:
        target = folder / path.name
        shutil.copyfile(path, target)
        copied.append(target)

    model_ref = _class_ref(type(model))
    # For a VLM, AutoModel is the whole VLM, not its backbone: generic clients (lmms-eval's `huggingface` model)
    # fall back to it and call `generate`, as for other remote-code VLMs.
    model_entries = {"AutoConfig": _class_ref(type(model.config)), "AutoModel": model_ref}
    if model_type == "evotok_vlm":
        # Text-only prompts run too (pixel_values is optional), so the causal-LM Auto class fits as well.
        model_entries.update({"AutoModelForImageTextToText": model_ref, "AutoModelForCausalLM": model_ref})
    _write_json(config_path, _add_auto_map(config, model_entries))

    image_entry = {"AutoImageProcessor": _class_ref(type(image_processor))}
    wrote_image_processor = False
    image_processor_path = folder / IMAGE_PROCESSOR_NAME
    if image_processor_path.is_file():
        _write_json(image_processor_path, _add_auto_map(_read_json(image_processor_path), image_entry))
        wrote_image_processor = True
    processor_path = folder / PROCESSOR_NAME
    if processor_path.is_file():
        data = _read_json(processor_path)
        if processor is not None:
            _add_auto_map(data, {"AutoProcessor": _class_ref(type(processor))})
        if isinstance(data.get("image_processor"), dict):
            _add_auto_map(data["image_processor"], image_entry)
            wrote_image_processor = True
        _write_json(processor_path, data)
    elif processor is not None:
        raise ValueError(f"export_remote_code: {folder} has no {PROCESSOR_NAME}; save the processor there first.")
    if not wrote_image_processor:
        raise ValueError(
            f"export_remote_code: {folder} holds no image processor config ({IMAGE_PROCESSOR_NAME} or an "
            f"'image_processor' entry of {PROCESSOR_NAME}); save the processor there first."
        )
    logger.info("exported %d code files and auto_map to %s", len(copied), folder)
    return copied


__all__ = ["RemoteCodeExportError", "check_flat_imports", "export_remote_code", "exportable_files"]
