"""Publish a saved EvoTok tokenizer or VLM folder on the Hugging Face Hub, with a rendered model card.

Writes a complete folder (weights, config, image processor / processor, generation config for the VLM, README.md
model card; with --remote-code the flat modeling/processing code and `auto_map`, so the repository loads with
`trust_remote_code=True` without evotok_hf), then creates the repository and uploads the folder. The source folder is
never modified: everything is written to a staging folder that is moved to --output-dir at the end.

    # a tokenizer trained with this project, with its evaluation report, loadable without evotok_hf
    python scripts/push_to_hub.py --model-dir outputs/demo-photos/model --repo-id me/evotok-small --license apache-2.0 \\
        --eval-json outputs/eval/report.json --remote-code

    # converted official weights (no licence is stated by the authors: the card says so), written locally only
    python scripts/push_to_hub.py --model-dir converted/evotok --repo-id me/evotok --official --dry-run

Uploading needs a Hub token (`huggingface-cli login` or HF_TOKEN); --dry-run never touches the network. The demo
Space that serves published models: scripts/push_space.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from evotok_hf import (  # importing evotok_hf registers the Auto classes
    EvoTokForConditionalGeneration,
    EvoTokImageProcessor,
    EvoTokModel,
    EvoTokProcessor,
)
from evotok_hf.command_line import run_from_shell
from evotok_hf.hub.model_card import render_tokenizer_card, render_vlm_card
from evotok_hf.hub.publish import add_publish_arguments, publish_folder
from evotok_hf.hub.remote_code import export_remote_code
from evotok_hf.hub.staging import check_output_dir, staged_output_dir

# model_type -> (model class, processor class, card renderer)
KINDS = {
    "evotok": (EvoTokModel, EvoTokImageProcessor, render_tokenizer_card),
    "evotok_vlm": (EvoTokForConditionalGeneration, EvoTokProcessor, render_vlm_card),
}
EVAL_REPORT_NAME = "evaluation/reconstruction_report.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a saved EvoTokModel or EvoTok VLM folder (with its processor)")
    p.add_argument("--repo-id", required=True, help="Hub repository, 'org/name'")
    p.add_argument("--license", default=None,
                   help="licence of weights trained with this project (Hub identifier, e.g. apache-2.0); required "
                        "unless --official")  # fmt: skip
    p.add_argument("--official", action="store_true",
                   help="the weights are converted from the EvoTok authors' checkpoints (card: no licence stated)")
    p.add_argument("--eval-json", default=None, help="a reconstruction report.json measured on these weights")
    p.add_argument("--eval-dataset", default=None,
                   help="override the dataset the report records (Hub id or name); default: the report's 'dataset'")
    p.add_argument("--eval-split", default=None, help="override the split the report records")
    p.add_argument("--base-model", action="append", default=None, help="Hub id of a base model (repeatable)")
    p.add_argument("--dataset", action="append", default=None, help="Hub id of a training dataset (repeatable)")
    p.add_argument("--remote-code", action="store_true",
                   help="ship the flat modeling/processing code + auto_map (loads with trust_remote_code=True)")
    add_publish_arguments(p)
    return p.parse_args(argv)


def _model_type(model_dir: Path) -> str:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model-dir {str(model_dir)!r} has no config.json; pass a save_pretrained folder.")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in KINDS:
        raise ValueError(
            f"--model-dir {str(model_dir)!r} holds a model of type {model_type!r}; expected one of {sorted(KINDS)}."
        )
    return model_type


def _output_dir(requested: str | None, model_dir: Path) -> Path | None:
    """The folder to write (None: a new temporary folder), refusing anything that could overwrite data."""
    if requested is None:
        return None
    return check_output_dir(requested, sources=[model_dir], flag="--output-dir")


def build_folder(args, model_dir: Path, output: Path | None) -> Path:
    """Write the complete repository folder to a staging folder beside `output`, then move it there (with no
    `output`, the staging folder, a new temporary folder, is the result)."""
    model_type = _model_type(model_dir)
    model_class, processor_class, render_card = KINDS[model_type]
    # The card validates the licence, repo id and evaluation report: fail before loading any weights.
    config = model_class.config_class.from_pretrained(model_dir)
    card = render_card(
        config, repo_id=args.repo_id, license=args.license, official=args.official,
        eval_results_path=args.eval_json, base_model=args.base_model, datasets=args.dataset,
        eval_dataset=args.eval_dataset, eval_split=args.eval_split, remote_code=args.remote_code,
    )  # fmt: skip
    model = model_class.from_pretrained(model_dir, dtype="auto")
    try:
        processor = processor_class.from_pretrained(model_dir)
    except OSError as err:
        raise ValueError(
            f"--model-dir {str(model_dir)!r} has no {processor_class.__name__} config; save the processor with the "
            "model so the published repository can preprocess images."
        ) from err

    with staged_output_dir(output, temp_prefix=f"evotok-hub-{args.repo_id.split('/')[-1]}-") as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if args.remote_code:
            export_remote_code(model, processor, staging)
        if args.eval_json:
            (staging / EVAL_REPORT_NAME).parent.mkdir(parents=True)
            shutil.copyfile(args.eval_json, staging / EVAL_REPORT_NAME)
        card.save(staging / "README.md")
    return output or staging


def main(argv=None) -> dict:
    args = parse_args(argv)
    model_dir = Path(args.model_dir).resolve()
    if not model_dir.is_dir():
        raise ValueError(f"--model-dir {args.model_dir!r} is not a folder.")
    output = _output_dir(args.output_dir, model_dir)
    folder = build_folder(args, model_dir, output)
    result = publish_folder(
        folder, args.repo_id, repo_type="model", private=args.private, dry_run=args.dry_run,
        commit_message=args.commit_message or "Upload EvoTok model (scripts/push_to_hub.py of evotok_hf)",
    )
    print(f"uploaded {folder} to {result['repo_url']}" if result["uploaded"] else folder)
    return result


if __name__ == "__main__":
    run_from_shell(main, __file__)
