"""VLM fine-tuning: assistant-only labels, both dataset layouts, stages, LoRA placement, the train_vlm.py script."""

import json
import logging
import os
import runpy
from pathlib import Path

import datasets
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
from vlm_helpers import bpe_tokenizer, tiny_processor, tiny_vlm_config

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokProcessor
from evotok_hf.training.vlm import (
    IGNORE_INDEX,
    EvoTokVLMDataCollator,
    VLMLoraArguments,
    llava_to_messages,
    lora_target_regex,
    prepare_model_for_stage,
)

CORPUS = [
    "system user assistant You are a helpful assistant.",
    "Describe the image. A cat on a red mat. What colour is the sky? Blue, with white clouds.",
]
ROOT = Path(__file__).resolve().parents[1]
TURNS = [("Describe the image.", "A cat on a red mat."), ("What colour is the sky?", "Blue, with white clouds.")]


@pytest.fixture(scope="module")
def text_tokenizer():
    # Byte-level BPE: decoding reproduces the text exactly, so labels can be checked against the assistant strings.
    return bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def vision_config():
    return EvoTokConfig.from_preset("evotok-tiny")


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return tiny_processor(text_tokenizer)


def build_vlm(text_tokenizer, vision_config, seed=0):
    torch.manual_seed(seed)
    return EvoTokForConditionalGeneration(tiny_vlm_config(text_tokenizer, vision_config=vision_config.to_dict()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, text_tokenizer, vision_config, processor):
    """A saved tiny VLM + processor, 4 real photo crops, the same conversations as LLaVA JSON and as a messages
    dataset on disk."""
    from evotok_hf.bundled_photos import load_bundled_photos

    root = tmp_path_factory.mktemp("vlm_data")
    model = build_vlm(text_tokenizer, vision_config)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "images").mkdir()
    photos = list(load_bundled_photos(["astronaut", "chelsea", "coffee", "rocket"]).values())
    rows, messages_rows = [], []
    for index, photo in enumerate(photos):
        photo = photo.convert("RGB").resize((48, 40))
        photo.save(root / "images" / f"{index}.png")
        (q1, a1), (q2, a2) = TURNS
        rows.append({
            "id": f"row{index}", "image": f"{index}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{q1}"}, {"from": "gpt", "value": a1},
                {"from": "human", "value": q2}, {"from": "gpt", "value": a2},
            ],
        })  # fmt: skip
        messages_rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
                {"role": "assistant", "content": [{"type": "text", "text": a1}]},
                {"role": "user", "content": [{"type": "text", "text": q2}]},
                {"role": "assistant", "content": [{"type": "text", "text": a2}]},
            ],
            "images": [PIL.Image.open(root / "images" / f"{index}.png").convert("RGB")],
        })  # fmt: skip
    with open(root / "llava.json", "w") as f:
        json.dump(rows, f)
    datasets.Dataset.from_list(messages_rows).save_to_disk(str(root / "messages"))
    return root


def load_rows(data_dir):
    with open(data_dir / "llava.json") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- labels
def roles_by_token(input_ids, tokenizer):
    """Independent ChatML parser over token ids: the role of each content token (the end-of-turn token and the
    newline after it belong to the turn), None for the header tokens."""
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, roles, position = input_ids.tolist(), [None] * len(input_ids), 0
    while position < len(ids):
        assert ids[position] == im_start, "every ChatML turn starts with <|im_start|>"
        header_end = position + 1
        while "\n" not in tokenizer.decode(ids[position + 1 : header_end]):
            header_end += 1
        role = tokenizer.decode(ids[position + 1 : header_end]).strip()
        end = ids.index(im_end, header_end)
        stop = end + 1 + (end + 1 < len(ids) and tokenizer.decode(ids[end + 1 : end + 2]) == "\n")
        for k in range(header_end, stop):
            roles[k] = role
        position = stop
    return roles


def test_collator_labels_only_assistant_turns(data_dir, processor, text_tokenizer, vision_config):
    collator = EvoTokVLMDataCollator(processor, max_length=None, image_folder=str(data_dir / "images"))
    batch = collator(load_rows(data_dir)[:2])
    assert batch["pixel_values"].shape == (2, 3, vision_config.image_size, vision_config.image_size)
    for row in range(2):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert int((ids == processor.image_token_id).sum()) == vision_config.grid_size**2
        roles = roles_by_token(ids[batch["attention_mask"][row].bool()], text_tokenizer)
        expected = [r == "assistant" for r in roles]
        assert (labels[: len(expected)] != IGNORE_INDEX).tolist() == expected
        labelled_text = text_tokenizer.decode(ids[labels != IGNORE_INDEX])
        assert labelled_text == "".join(f"{answer}<|im_end|>\n" for _, answer in TURNS)


def test_llava_and_messages_layouts_give_the_same_batch(data_dir, processor):
    collator = EvoTokVLMDataCollator(processor, image_folder=str(data_dir / "images"))
    from_llava = collator(load_rows(data_dir)[:2])
    from_messages = collator(list(datasets.load_from_disk(str(data_dir / "messages")).select(range(2))))
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        torch.testing.assert_close(from_llava[key], from_messages[key], rtol=0, atol=0)


def test_forward_loss_is_cross_entropy_over_assistant_tokens(data_dir, processor, text_tokenizer, vision_config):
    model = build_vlm(text_tokenizer, vision_config).eval()
    collator = EvoTokVLMDataCollator(processor, image_folder=str(data_dir / "images"))
    rows = load_rows(data_dir)[:2]
    rows[1]["conversations"] = rows[1]["conversations"][:2]  # different lengths -> padding in the batch
    batch = collator(rows)
    with torch.no_grad():
        out = model(**batch)
    # manual: next-token cross-entropy at the positions whose *target* token is an assistant token (by the parser)
    losses = []
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n]
        roles = roles_by_token(ids, text_tokenizer)
        targets = [k for k in range(1, n) if roles[k] == "assistant"]
        logits = out.logits[row, [k - 1 for k in targets]].double()
        losses.append(F.cross_entropy(logits, ids[targets], reduction="none"))
    manual = torch.cat(losses).mean()
    torch.testing.assert_close(out.loss.double(), manual, rtol=1e-5, atol=1e-6)


def test_pretokenised_codes_give_the_same_loss(data_dir, processor, text_tokenizer, vision_config):
    model = build_vlm(text_tokenizer, vision_config).eval()
    rows = load_rows(data_dir)[:2]
    collator = EvoTokVLMDataCollator(processor, image_folder=str(data_dir / "images"))
    batch = collator(rows)
    with torch.no_grad():
        codes = model.vision_tower.encode(batch["pixel_values"]).codes
    for row, row_codes in zip(rows, codes):
        row["image_codes"] = [row_codes.tolist()]
    coded = collator(rows)
    assert "pixel_values" not in coded and coded["image_codes"].shape == codes.shape
    with torch.no_grad():
        torch.testing.assert_close(model(**coded).loss, model(**batch).loss)


def test_collator_errors(data_dir, processor):
    rows = load_rows(data_dir)
    collator = EvoTokVLMDataCollator(processor, image_folder=str(data_dir / "images"))
    with pytest.raises(FileNotFoundError, match="image_folder"):
        EvoTokVLMDataCollator(processor, image_folder=str(data_dir))(rows[:1])
    two_placeholders = json.loads(json.dumps(rows[0]))
    two_placeholders["conversations"][0]["value"] = "<image>\n<image>\nDescribe the image."
    with pytest.raises(ValueError, match="2 image placeholder"):
        collator([two_placeholders])
    with pytest.raises(ValueError, match="would cut its image tokens"):
        EvoTokVLMDataCollator(processor, max_length=8, image_folder=str(data_dir / "images"))(rows[:1])
    with pytest.raises(ValueError, match="neither `conversations`"):
        collator([{"text": "hello"}])
    with pytest.raises(ValueError, match="unknown speaker"):
        llava_to_messages([{"from": "robot", "value": "hi"}])
    # truncation that keeps the image is fine
    long_batch = EvoTokVLMDataCollator(processor, max_length=40, image_folder=str(data_dir / "images"))(rows[:1])
    assert long_batch["input_ids"].shape[1] == 40


# ----------------------------------------------------------------------------- stages and LoRA
def test_lora_targets_only_the_language_model(text_tokenizer, vision_config):
    import re

    model = build_vlm(text_tokenizer, vision_config)
    regex = lora_target_regex(["q_proj", "v_proj"])
    names = [name for name, _ in model.named_modules()]
    suffix_matches = [n for n in names if n.endswith(("q_proj", "v_proj"))]
    assert any(".vision_tower." in n for n in suffix_matches), "the tiny SigLIP has q_proj/v_proj: suffixes are unsafe"
    assert all(".language_model." in n for n in names if re.fullmatch(regex, n))
    peft_model = prepare_model_for_stage(model, "sft", VLMLoraArguments(use_lora=True, lora_r=4,
                                                                         lora_target_modules=["q_proj", "v_proj"]))  # fmt: skip
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == 2 * layers and not any("vision_tower" in n for n in wrapped)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("multi_modal_projector" in n) for n in trainable)
    with pytest.raises(ValueError, match="stage 1"):
        prepare_model_for_stage(build_vlm(text_tokenizer, vision_config), "pretrain", VLMLoraArguments(use_lora=True))
    with pytest.raises(ValueError, match="stage must be"):
        prepare_model_for_stage(build_vlm(text_tokenizer, vision_config), "dpo")


def run_script(tmp_path, data_dir, *extra, output="out", dataset="llava.json"):
    main = runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="not_main")["main"]
    args = [
        "--model_name_or_path", str(data_dir / "model"), "--dataset", str(data_dir / dataset),
        "--image_folder", str(data_dir / "images"), "--output_dir", str(tmp_path / output),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
        "--logging_steps", "1", "--use_cpu", "--seed", "0", "--save_only_model", "false", *extra,
    ]  # fmt: skip
    return main(args)


def state(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_two_lora_sft_steps_change_only_lora_and_projector(tmp_path, data_dir, text_tokenizer, vision_config):
    from peft import PeftModel

    out = run_script(tmp_path, data_dir, "--stage", "sft", "--use_lora", "--lora_r", "4", "--max_steps", "2",
                     "--activation_checkpointing")  # fmt: skip
    before = EvoTokForConditionalGeneration.from_pretrained(data_dir / "model")
    base_state = {k: v.clone() for k, v in before.state_dict().items()}
    peft_model = PeftModel.from_pretrained(before, os.path.join(out, "adapter"))
    after = peft_model.state_dict()
    changed, lora_or_projector = set(), set()
    for name, value in after.items():
        if "lora_" in name:
            lora_or_projector.add(name)
            continue
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        base_name = base_name.replace(".modules_to_save.default", "").replace(".original_module", "")
        if not torch.equal(value, base_state[base_name]):
            changed.add(name)
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert any("lora_B" in n and after[n].abs().sum() > 0 for n in lora_or_projector)  # B starts at zero
    # the merged folder loads as a plain VLM and matches the adapter model
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    batch = EvoTokVLMDataCollator(EvoTokProcessor.from_pretrained(out), image_folder=str(data_dir / "images"))(
        load_rows(data_dir)[:1]
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft_model.eval()(**batch).logits, rtol=1e-4, atol=1e-4)


def test_stage1_trains_only_the_projector_with_the_plain_trainer(tmp_path, data_dir):
    out = run_script(tmp_path, data_dir, "--stage", "pretrain", "--trainer", "hf", "--max_steps", "2",
                     dataset="messages")  # fmt: skip
    before, after = state(data_dir / "model"), state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("model.multi_modal_projector.")}
    with open(os.path.join(out, "train_results.json")) as f:
        assert json.load(f)["stage"] == "pretrain"


def test_full_sft_checkpoints_and_resume(tmp_path, data_dir):
    run_script(tmp_path, data_dir, "--stage", "sft", "--max_steps", "2", "--save_steps", "1")
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-2"
    ]  # fmt: skip
    before = state(data_dir / "model")
    after = state(tmp_path / "out" / "checkpoint-2")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.language_model.") for k in changed)
    assert not any(k.startswith("model.vision_tower.") for k in changed)
    # resume the newest checkpoint and run one more step
    run_script(tmp_path, data_dir, "--stage", "sft", "--max_steps", "3", "--save_steps", "1",
               "--resume_from_checkpoint", "latest")  # fmt: skip
    with open(tmp_path / "out" / "checkpoint-3" / "trainer_state.json") as f:
        trainer_state = json.load(f)
    assert trainer_state["global_step"] == 3
    logged_steps = [entry["step"] for entry in trainer_state["log_history"] if "loss" in entry]
    assert logged_steps == [1, 2, 3]  # steps 1-2 come from the checkpoint, only step 3 was trained again


def killed_while_saving_weights(checkpoint: Path) -> None:
    """What a kill during the Trainer's save leaves: the weights cut short and no trainer state (written last)."""
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (checkpoint / "trainer_state.json").unlink()


def killed_while_saving_the_state(checkpoint: Path) -> None:
    """A kill while `trainer_state.json` is written: the JSON cut short."""
    state_file = checkpoint / "trainer_state.json"
    state_file.write_text(state_file.read_text()[:100])


@pytest.mark.parametrize("damage", [killed_while_saving_weights, killed_while_saving_the_state])
def test_resume_latest_skips_a_half_written_newest_checkpoint(tmp_path, data_dir, damage, caplog):
    run_script(tmp_path, data_dir, "--stage", "pretrain", "--trainer", "hf", "--max_steps", "2", "--save_steps", "1")
    with open(tmp_path / "out" / "checkpoint-2" / "trainer_state.json") as f:
        first_run = {entry["step"]: entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry}
    damage(tmp_path / "out" / "checkpoint-2")
    with pytest.raises(ValueError, match="checkpoint-2.*incomplete"):  # named explicitly: refused, with the reason
        run_script(tmp_path, data_dir, "--stage", "pretrain", "--trainer", "hf", "--max_steps", "3",
                   "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2"))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="train_vlm"):
        run_script(tmp_path, data_dir, "--stage", "pretrain", "--trainer", "hf", "--max_steps", "3",
                   "--save_steps", "1", "--resume_from_checkpoint", "latest")  # fmt: skip
    assert "checkpoint-2" in caplog.text and "incomplete" in caplog.text
    with open(tmp_path / "out" / "checkpoint-3" / "trainer_state.json") as f:
        trainer_state = json.load(f)
    resumed_run = {entry["step"]: entry["loss"] for entry in trainer_state["log_history"] if "loss" in entry}
    assert list(resumed_run) == [1, 2, 3]  # step 1 comes from checkpoint-1; steps 2 and 3 were trained again
    assert resumed_run[2] == pytest.approx(first_run[2], rel=1e-5)  # step 2 trained again from checkpoint-1's state


def test_resume_latest_on_an_empty_output_folder_starts_fresh_and_says_so(tmp_path, data_dir, caplog):
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.INFO, logger="train_vlm"):
        run_script(tmp_path, data_dir, "--stage", "pretrain", "--trainer", "hf", "--max_steps", "1",
                   "--resume_from_checkpoint", "latest")  # fmt: skip
    assert "starting from scratch" in caplog.text
    with open(tmp_path / "out" / "train_results.json") as f:
        assert json.load(f)["stage"] == "pretrain"


def test_script_argument_errors(tmp_path, data_dir):
    parse_args = runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="not_main")["parse_args"]
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", str(tmp_path), "--use_cpu", "--model_name_or_path", str(data_dir / "model")])
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", str(tmp_path), "--use_cpu", "--dataset", "x.json"])
