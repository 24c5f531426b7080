"""Resuming tokenizer training: a run killed after any checkpoint and resumed from it ends bit for bit where the
uninterrupted run ends (same machine, same thread count), and `latest` on an empty output folder starts fresh and
says so."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from evotok_hf.training.trainer import TokenizerTrainer, latest_checkpoint, training_arguments_from_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny model on the bundled photos with the real EfficientNet-Lite0 teacher, the GAN from step 2 and EMA weights:
# 12 train crops in batches of 4, so an epoch is 3 steps.
TINY = {
    "model_preset": "evotok-tiny",
    "model_overrides": {"codebook_size": 64, "ema_warmup_steps": 0},
    "train_batch_size": 4,
    "crops_per_photo": 1,
    "crop_size": 64,
    "disc_start": 2,
    "disc_weight": 0.1,
    "disc_channels": 8,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 1,
    "log_steps": 1,
    "eval_data": "none",
    "use_ema": True,
    "max_train_steps": 40,
}
STEPS_PER_EPOCH = 3


def run(output_dir, **overrides) -> dict:
    """Train in this process and return the exported weights."""
    args = training_arguments_from_preset("cpu-small", **{**TINY, "output_dir": str(output_dir), **overrides})
    trainer = TokenizerTrainer(args)
    trainer.train()
    trainer.export(str(output_dir / "final"))
    trainer.end()
    return {"resumed_from": trainer.resumed_from, **load_file(str(output_dir / "final" / "model.safetensors"))}


def cli(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("uninterrupted"), checkpointing_steps=0)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The same run in another process (this process's thread count), checkpointing every step, SIGKILLed once
    checkpoint-<STEPS_PER_EPOCH + 1> exists. Returns its output folder."""
    output_dir = tmp_path_factory.mktemp("killed") / "run"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--preset", "cpu-small",
         *cli({**TINY, "output_dir": str(output_dir), "checkpointing_steps": 1, "checkpoints_total_limit": 1000})],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wanted = output_dir / "checkpoints" / f"checkpoint-{STEPS_PER_EPOCH + 1}"
    deadline = time.time() + 240
    try:
        while not wanted.exists():
            if proc.poll() is not None:
                pytest.fail(f"training exited before the kill: {proc.stderr.read()[-3000:]}")
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return output_dir


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differing = {name: float((a[name].float() - b[name].float()).abs().max()) for name in a
                 if name != "resumed_from" and not torch.equal(a[name], b[name])}  # fmt: skip
    assert not differing, f"tensors differ from the uninterrupted run (max abs difference): {differing}"


# one batch into the first epoch (the resumed part then crosses epoch boundaries), on an epoch boundary, one batch
# into the second epoch
@pytest.mark.parametrize("step", [1, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1])
def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, uninterrupted, killed_run, step):
    checkpoint = str(killed_run / "checkpoints" / f"checkpoint-{step}")
    resumed = run(tmp_path, checkpointing_steps=0, resume_from_checkpoint=checkpoint)
    assert resumed["resumed_from"] == checkpoint
    assert_bitwise_equal(resumed, uninterrupted)


def test_streaming_resume_equals_the_uninterrupted_run(tmp_path):
    """A streaming dataset has no length: the resume position is the recorded (epoch, batches into it), not one
    derived from the step count. Five photos in batches of 2 make 2-batch epochs; the run checkpoints every step
    (saving changes nothing), so its final weights are the uninterrupted run's."""
    from evotok_hf.bundled_photos import load_bundled_photos

    folder = tmp_path / "photos"
    folder.mkdir()
    for index, photo in enumerate(load_bundled_photos(["astronaut", "rocket", "coffee", "chelsea", "camera"]).values()):
        photo.convert("RGB").resize((80, 64)).save(folder / f"{index}.png")
    streaming = {"train_data": str(folder), "streaming": True, "train_batch_size": 2, "max_train_steps": 5,
                 "checkpoints_total_limit": 10}  # fmt: skip
    uninterrupted = run(tmp_path / "run", checkpointing_steps=1, **streaming)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "checkpoint-3")  # one batch into the second epoch
    resumed = run(tmp_path / "resumed", checkpointing_steps=0, resume_from_checkpoint=checkpoint, **streaming)
    assert resumed["resumed_from"] == checkpoint
    assert_bitwise_equal(resumed, uninterrupted)


def test_checkpoints_hold_a_pretrained_discriminator_and_old_checkpoints_still_resume(tmp_path):
    """A checkpoint's discriminator/ is a `save_pretrained` folder. Checkpoints written before held its weights beside
    a hand-written config.json; one rewritten to that layout resumes to the weights of the uninterrupted run (which
    went through the same checkpoint: saving changes nothing) and restores the discriminator exactly."""
    from safetensors.torch import save_file

    from evotok_hf.training.discriminator import PatchGANDiscriminator

    steps = {"max_train_steps": 5, "checkpoints_total_limit": 10}  # the GAN trains from step 2
    uninterrupted = run(tmp_path / "run", checkpointing_steps=3, **steps)
    discriminator = tmp_path / "run" / "checkpoints" / "checkpoint-3" / "discriminator"
    saved = load_file(str(discriminator / "model.safetensors"))
    loaded = PatchGANDiscriminator.from_pretrained(discriminator)
    assert loaded.config.base_channels == TINY["disc_channels"]
    assert all(torch.equal(saved[name], tensor) for name, tensor in loaded.state_dict().items())

    old = tmp_path / "old-checkpoint-3"
    shutil.copytree(discriminator.parent, old)
    shutil.rmtree(old / "discriminator")
    (old / "discriminator").mkdir()
    save_file(saved, str(old / "discriminator" / "model.safetensors"))
    (old / "discriminator" / "config.json").write_text(json.dumps({"base_channels": TINY["disc_channels"],
                                                                   "num_layers": 3, "norm": "group"}))  # fmt: skip
    args = training_arguments_from_preset("cpu-small", **{**TINY, **steps, "output_dir": str(tmp_path / "resumed"),
                                                          "checkpointing_steps": 0, "resume_from_checkpoint": str(old)})
    trainer = TokenizerTrainer(args)
    restored = trainer._unwrap(trainer.discriminator).state_dict()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[name].cpu(), saved[name]) for name in saved)
    trainer.train()
    trainer.export(str(tmp_path / "resumed" / "final"))
    trainer.end()
    final = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    resumed = {"resumed_from": trainer.resumed_from, **final}
    assert resumed["resumed_from"] == str(old)
    assert_bitwise_equal(resumed, uninterrupted)


def test_resume_latest_on_an_empty_output_folder_starts_fresh_and_says_so(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    args = training_arguments_from_preset(
        "cpu-small", **{**TINY, "output_dir": str(tmp_path / "run"), "resume_from_checkpoint": "latest"}
    )
    with caplog.at_level(logging.INFO, logger="evotok_hf.training.trainer"):
        trainer = TokenizerTrainer(args)
    assert trainer.global_step == 0 and trainer.resumed_from is None
    assert "starting from scratch" in caplog.text
    assert latest_checkpoint(args.output_dir) is None
