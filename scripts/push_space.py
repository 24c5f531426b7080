"""Publish the EvoTok demo (spaces/evotok-demo) as a Hugging Face Space that serves models from the Hub.

Writes a complete Space folder, then creates the Space (gradio SDK) and uploads the folder:

    app.py, requirements.txt        from spaces/evotok-demo
    README.md                       its front matter's `models:` lists the served model repositories
    space_config.json               {"tokenizer": ..., "vlm": ...}: what app.py serves when the Space variables
                                    EVOTOK_TOKENIZER / EVOTOK_VLM are not set (they still override it)
    evotok_hf/                      a copy of src/evotok_hf (without __pycache__): evotok_hf is not on PyPI, and
                                    `python app.py` puts the app's folder first on sys.path, so the copy is imported
    LICENSE                         the licence of that code

    # the tokenizer and VLM repositories published with scripts/push_to_hub.py
    python scripts/push_space.py --repo-id me/evotok-demo --tokenizer me/evotok --vlm me/evotok-qwen2.5-7b
    # write the folder only, and try it locally: cd space && python app.py
    python scripts/push_space.py --repo-id me/evotok-demo --tokenizer me/evotok --dry-run --output-dir space

Uploading needs a Hub token (`huggingface-cli login` or HF_TOKEN); --dry-run never touches the network. The Space
downloads the models when it starts; a 7B VLM needs GPU hardware (Space settings).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from huggingface_hub import SpaceCard
from huggingface_hub.utils import HFValidationError, validate_repo_id

from evotok_hf.command_line import run_from_shell
from evotok_hf.hub.publish import add_publish_arguments, publish_folder
from evotok_hf.hub.staging import check_output_dir, staged_output_dir

ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = ROOT / "spaces" / "evotok-demo"
PACKAGE_DIR = ROOT / "src" / "evotok_hf"
LICENSE_PATH = ROOT / "LICENSE"
SPACE_CONFIG_NAME = "space_config.json"  # read by app.py (SPACE_CONFIG_PATH)
BYTECODE = ("__pycache__", "*.pyc", "*.pyo")
# A local run's space_config.json or package copy in spaces/evotok-demo is never published: this script writes both.
NOT_COPIED_FROM_SPACE = shutil.ignore_patterns(*BYTECODE, SPACE_CONFIG_NAME, "evotok_hf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo-id", required=True, help="the Space, 'org/name'")
    p.add_argument("--tokenizer", required=True, help="Hub id of the EvoTok tokenizer the Space serves")
    p.add_argument("--vlm", default=None, help="Hub id of the EvoTok VLM the Space serves (enables the Chat tab)")
    add_publish_arguments(p, "Space")
    return p.parse_args(argv)


def _hub_id(value: str, flag: str, need_namespace: bool = False) -> str:
    if Path(value).exists():
        raise ValueError(
            f"{flag} {value!r} is a local path, but a Space loads its models from the Hub: publish the folder with "
            "scripts/push_to_hub.py and pass its repository id."
        )
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ValueError(f"{flag} {value!r} is not a valid Hub repository id: {err}") from err
    if need_namespace and value.count("/") != 1:
        raise ValueError(f"{flag} must be 'org/name' (with a namespace), got {value!r}.")
    return value


def _output_dir(requested: str | None) -> Path | None:
    """The folder to write (None: a new temporary folder), refusing anything that could overwrite data."""
    if requested is None:
        return None
    return check_output_dir(requested, sources=[SPACE_DIR, PACKAGE_DIR], flag="--output-dir")


def build_space_folder(repo_id: str, tokenizer: str, vlm: str | None, output: Path | None) -> Path:
    """Write the Space folder to a staging folder beside `output`, then move it there (with no `output`, the
    staging folder, a new temporary folder, is the result)."""
    for source in (SPACE_DIR / "app.py", SPACE_DIR / "README.md", PACKAGE_DIR / "__init__.py"):
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: run this script from an evotok_hf repository checkout.")
    with staged_output_dir(output, temp_prefix=f"evotok-space-{repo_id.split('/')[-1]}-") as staging:
        shutil.copytree(SPACE_DIR, staging, ignore=NOT_COPIED_FROM_SPACE, dirs_exist_ok=True)
        shutil.copytree(PACKAGE_DIR, staging / "evotok_hf", ignore=shutil.ignore_patterns(*BYTECODE))
        if LICENSE_PATH.is_file():
            shutil.copyfile(LICENSE_PATH, staging / "LICENSE")
        card = SpaceCard.load(staging / "README.md")
        card.data.models = [tokenizer] + ([vlm] if vlm else [])
        card.save(staging / "README.md")
        with open(staging / SPACE_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump({"tokenizer": tokenizer, "vlm": vlm}, f, indent=2)
            f.write("\n")
    return output or staging


def main(argv=None) -> dict:
    args = parse_args(argv)
    repo_id = _hub_id(args.repo_id, "--repo-id", need_namespace=True)
    tokenizer = _hub_id(args.tokenizer, "--tokenizer")
    vlm = _hub_id(args.vlm, "--vlm") if args.vlm else None
    folder = build_space_folder(repo_id, tokenizer, vlm, _output_dir(args.output_dir))
    result = publish_folder(
        folder, repo_id, repo_type="space", private=args.private, dry_run=args.dry_run,
        commit_message=args.commit_message or "Upload the EvoTok demo (scripts/push_space.py of evotok_hf)",
        create_options={"space_sdk": "gradio"},
        # the package copy is replaced whole: no stale module survives
        upload_options={"delete_patterns": ["evotok_hf/**"]},
    )  # fmt: skip
    print(f"uploaded {folder} to {result['repo_url']}" if result["uploaded"] else folder)
    return result


if __name__ == "__main__":
    run_from_shell(main, __file__)
