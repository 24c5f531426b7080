"""The Accelerate training loop: a short run, kill + resume, non-finite losses, and a real 2-process run."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from evotok_hf.training.trainer import TokenizerTrainer, latest_checkpoint, training_arguments_from_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny model on the bundled photos with the real EfficientNet-Lite0 teacher; GAN from step 2.
TINY = {
    "model_preset": "evotok-tiny",
    "model_overrides": {"codebook_size": 64, "ema_warmup_steps": 0},
    "train_batch_size": 4,
    "crops_per_photo": 2,
    "crop_size": 64,
    "disc_start": 2,
    "disc_weight": 0.1,
    "disc_channels": 8,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 1,
    "log_steps": 1,
    "eval_max_images": 4,
}


def tiny_args(tmp_path, **overrides):
    return training_arguments_from_preset("cpu-small", **{**TINY, "output_dir": str(tmp_path / "run"), **overrides})


def cli(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, dict):
            import json

            out += [f"--{key}", json.dumps(value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def test_short_run_trains_checkpoints_and_exports(tmp_path):
    args = tiny_args(tmp_path, max_train_steps=4, checkpointing_steps=2, use_ema=True)
    trainer = TokenizerTrainer(args)
    before = {k: v.clone() for k, v in trainer._unwrap(trainer.model).state_dict().items()}
    summary = trainer.train()
    assert summary["global_step"] == 4
    logged = summary["history"][-1]
    for term in ("reconstruction", "commitment", "semantic_cosine", "semantic_fold", "generator_adversarial",
                 "discriminator", "total", "lr"):
        assert term in logged, term
    assert logged["gan_weight"] == pytest.approx(0.1)  # past disc_start
    assert summary["history"][0]["gan_weight"] == 0.0  # step 1 < disc_start
    after = trainer._unwrap(trainer.model).state_dict()
    assert not torch.equal(after["encode_task_layer.2.weight"], before["encode_task_layer.2.weight"])
    assert not torch.equal(after["quantizer.codebook"], before["quantizer.codebook"])  # EMA updates ran
    assert torch.equal(after["encoder.head.probe"], before["encoder.head.probe"])  # frozen parts stay
    assert "eval_psnr" in summary["eval"] and "eval_ssim" in summary["eval"]
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    export = trainer.export(str(tmp_path / "final"))
    from transformers import AutoImageProcessor, AutoModel

    reloaded = AutoModel.from_pretrained(export)
    assert AutoImageProcessor.from_pretrained(export).size.height == 32
    # the export holds the EMA of the weights, the codebooks as trained
    ema = trainer.ema.shadow["encode_task_layer.2.weight"]
    assert torch.equal(reloaded.encode_task_layer[2].weight, ema)
    assert torch.equal(reloaded.quantizer.codebook, after["quantizer.codebook"])


def test_attn_implementation_reaches_every_attention_module_and_is_checked(tmp_path, monkeypatch):
    """`attn_implementation` (the shapes preset's eager) is the kernel the encoder, the pixel decoder's and the
    semantic decoder's attention run during training; an unknown name stops the run before it starts."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name, callers = "evotok_test_recording", set()

    def recording_attention(module, *args, **kwargs):
        callers.add(module)
        return sdpa_attention_forward(module, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, recording_attention)
    assert training_arguments_from_preset("shapes").attn_implementation == "eager"
    trainer = TokenizerTrainer(tiny_args(tmp_path, max_train_steps=1, checkpointing_steps=0, disc_start=5,
                                         attn_implementation=name))  # fmt: skip
    model = trainer._unwrap(trainer.model)
    # the attention modules a forward runs (the encoder's frozen pooling head and unused last layer do not run)
    ran = set()
    hooks = [m.register_forward_hook(lambda module, args, output: ran.add(module)) for m in model.modules()
             if type(m).__name__.endswith(("Attention", "AttnBlock"))]  # fmt: skip
    trainer.train()
    for hook in hooks:
        hook.remove()
    assert {type(m).__name__ for m in ran} == {"SiglipAttention", "EvoTokAttnBlock", "EvoTokSemanticAttention"}
    assert callers == ran
    with pytest.raises(ValueError, match="not_a_kernel"):
        TokenizerTrainer(tiny_args(tmp_path / "bad", attn_implementation="not_a_kernel"))


def test_kill_then_resume_restores_everything(tmp_path):
    base = dict(TINY, output_dir=str(tmp_path / "run"), checkpointing_steps=3, use_ema=True, eval_data="none",
                checkpoints_total_limit=10)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--preset", "cpu-small",
         *cli({**base, "max_train_steps": 100000})],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while latest_checkpoint(base["output_dir"]) is None or latest_checkpoint(base["output_dir"]).endswith("-3"):
            assert proc.poll() is None, "training exited early"
            assert time.time() < deadline, "no second checkpoint in time"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    checkpoint = latest_checkpoint(base["output_dir"])
    step = int(checkpoint.rsplit("-", 1)[1])
    assert step >= 6 and step % 3 == 0

    args = training_arguments_from_preset("cpu-small", **{**base, "max_train_steps": step + 2,
                                                           "resume_from_checkpoint": "latest"})
    trainer = TokenizerTrainer(args)
    assert trainer.global_step == step and trainer.resumed_from == checkpoint
    model = trainer._unwrap(trainer.model)
    for name, tensor in load_file(os.path.join(checkpoint, "tokenizer", "model.safetensors")).items():
        assert torch.equal(model.state_dict()[name], tensor), name  # includes the codebook EMA statistics
    for name, tensor in load_file(os.path.join(checkpoint, "discriminator", "model.safetensors")).items():
        assert torch.equal(trainer._unwrap(trainer.discriminator).state_dict()[name], tensor), name
    for name, tensor in load_file(os.path.join(checkpoint, "ema", "model.safetensors")).items():
        assert torch.equal(trainer.ema.shadow[name], tensor), name
    for optimizer, filename in ((trainer.optimizer, "optimizer.bin"), (trainer.disc_optimizer, "optimizer_1.bin")):
        saved = torch.load(os.path.join(checkpoint, filename), weights_only=True)
        live = optimizer.state_dict()
        assert saved["state"].keys() == live["state"].keys() and len(saved["state"]) > 0
        for key in saved["state"]:
            for field, value in saved["state"][key].items():
                assert torch.equal(torch.as_tensor(live["state"][key][field]), torch.as_tensor(value)), (filename, key)
    saved_scheduler = torch.load(os.path.join(checkpoint, "scheduler.bin"), weights_only=True)
    assert trainer.lr_scheduler.state_dict()["last_epoch"] == saved_scheduler["last_epoch"] == step
    from accelerate.utils.other import load as accelerate_load  # weights_only=True with numpy allow-listed

    rng = accelerate_load(os.path.join(checkpoint, "random_states_0.pkl"))
    assert torch.equal(torch.get_rng_state(), rng["torch_manual_seed"])
    import random

    import numpy as np

    assert random.getstate() == rng["random_state"]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng["numpy_random_seed"])
               if isinstance(a, np.ndarray))
    summary = trainer.train()
    assert summary["global_step"] == step + 2


def test_non_finite_loss_stops_with_step_and_term_and_writes_no_checkpoint(tmp_path):
    args = tiny_args(tmp_path, max_train_steps=3, checkpointing_steps=1, eval_data="none")
    trainer = TokenizerTrainer(args)
    with torch.no_grad():
        trainer._unwrap(trainer.model).decode_task_layer[2].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 0: semantic_cosine"):
        trainer.train()
    assert latest_checkpoint(args.output_dir) is None


class NanOnce(torch.nn.Module):
    """Wraps a teacher and returns NaN features on its first call only."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.calls, self.feature_dim = teacher, 0, teacher.feature_dim

    def forward(self, x):
        self.calls += 1
        out = self.teacher(x)
        return out * float("nan") if self.calls == 1 else out


def test_non_finite_loss_can_be_skipped(tmp_path):
    args = tiny_args(tmp_path, max_train_steps=2, eval_data="none", on_nonfinite="skip", checkpointing_steps=0)
    trainer = TokenizerTrainer(args)
    trainer.teacher = NanOnce(trainer.teacher)
    weight_before = trainer._unwrap(trainer.model).encode_task_layer[2].weight.detach().clone()
    summary = trainer.train()
    assert summary["global_step"] == 2 and trainer.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer._unwrap(trainer.model).parameters())
    assert not torch.equal(trainer._unwrap(trainer.model).encode_task_layer[2].weight, weight_before)


def test_two_process_run_keeps_ranks_identical(tmp_path):
    dump = tmp_path / "ranks"
    args = dict(TINY, output_dir=str(tmp_path / "run"), max_train_steps=3, checkpointing_steps=0, eval_data="none")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "train_and_dump_rank_state.py"), str(dump), "--preset", "cpu-small", *cli(args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(dump / "rank0.safetensors")
    rank1 = load_file(dump / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert int(rank0["quantizer.ema_step"]) == 3
