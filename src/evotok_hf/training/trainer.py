"""Accelerate training loop for the EvoTok tokenizer (generator step, then discriminator step, on the same batch).

The shape follows diffusers' `examples/vqgan/train_vqgan.py`: an `Accelerator` with two optimizers, save/load hooks
that write every checkpoint as `save_pretrained` folders, and `resume_from_checkpoint="latest"`. The objective is
the paper's: L2 reconstruction + perceptual + PatchGAN adversarial (from `disc_start`) + commitment + semantic
distillation (cosine + 4-fold cosine) against a frozen teacher; the codebooks learn by EMA inside the model.

Checkpoint folder `checkpoints/checkpoint-<step>/`:
    tokenizer/              EvoTokModel.save_pretrained (codebook EMA statistics included) + preprocessor config
    discriminator/          PatchGANDiscriminator.save_pretrained (config.json + model.safetensors)
    ema/                    model.safetensors (only with use_ema): the EMA of the trainable tokenizer weights
    optimizer*.bin, scheduler*.bin, random_states_<rank>.pkl    Accelerate's own files (loaded weights_only)
    trainer_state.json      step, epoch, batches of that epoch consumed
It is written to a temporary folder and renamed when complete, so a killed run never leaves a half checkpoint under
a checkpoint name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

from ..bundled_photos import bundled_photo_dataset
from ..evaluation import psnr, ssim
from ..frozen_networks import build_perceptual_loss, build_teacher
from ..image_datasets import (
    DataPosition,
    eval_transform,
    infinite_batches,
    load_image_dataset,
    make_dataloader,
    train_transform,
)
from ..modeling import EvoTokConfig, EvoTokModel
from ..processing import EvoTokImageProcessor
# The run's settings live in `arguments`; importing them from here too keeps one import line for scripts and users.
from .arguments import TRAINING_PRESETS, TokenizerTrainingArguments, training_arguments_from_preset
from .discriminator import PatchGANDiscriminator, PatchGANDiscriminatorConfig
from .losses import EvoTokLoss, check_finite

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


class ParameterEMA:
    """Exponential moving average of a model's trainable parameters (fp32 shadows), for evaluation / export."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))


def latest_checkpoint(output_dir: str) -> str | None:
    folder = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))
    ]
    return os.path.join(folder, max(steps)[1]) if steps else None


class TokenizerTrainer:
    """Sets up models, data, optimizers and Accelerate from `TokenizerTrainingArguments` (resuming if asked), then
    `train()` runs the loop and `export()` writes the final `save_pretrained` folder."""

    def __init__(self, args: TokenizerTrainingArguments):
        from accelerate import Accelerator
        from accelerate.utils import (
            DataLoaderConfiguration,
            DistributedDataParallelKwargs,
            ProjectConfiguration,
            set_seed,
        )

        self.args = args
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=args.report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # without a semantic loss the semantic decoder gets no gradient; DDP must then expect unused parameters
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.semantic_weight == 0)],
            cpu=not torch.cuda.is_available(),
        )
        set_seed(args.seed)
        self.global_step = 0
        self.data_position = DataPosition()  # saved in checkpoints; the training batches resume from it
        self.skipped_steps = 0
        self._skipped_in_a_row = 0

        # Teacher first: its width fixes the semantic decoder's output size.
        self.teacher = None
        config_overrides = dict(args.model_overrides)
        if args.semantic_weight > 0:
            grid = EvoTokConfig.from_preset(args.model_preset, **config_overrides).grid_size
            self.teacher = build_teacher(args.teacher, grid_size=grid, image_size=args.teacher_image_size)
            config_overrides.setdefault("teacher_dim", self.teacher.feature_dim)
        self.model = self._build_model(config_overrides)
        config = self.model.config
        size = config.image_size
        self.processor = EvoTokImageProcessor(size={"height": size, "width": size})
        self.discriminator = PatchGANDiscriminator(PatchGANDiscriminatorConfig(
            base_channels=args.disc_channels, num_layers=args.disc_layers, norm=args.disc_norm
        ))  # fmt: skip
        self.loss_fn = EvoTokLoss(args.loss_config(), perceptual=build_perceptual_loss(args.perceptual)
                                  if args.perceptual_weight > 0 else None)

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay
        )
        self.disc_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=args.disc_learning_rate or args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay,
        )
        from transformers import get_scheduler

        # Accelerate steps a prepared scheduler once per process at every optimizer step (as diffusers' scripts
        # assume), so the schedule's lengths are counted in those units.
        processes = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler, self.optimizer, num_warmup_steps=args.lr_warmup_steps * processes,
            num_training_steps=args.max_train_steps * processes,
        )
        self.train_dataloader = self._build_train_dataloader()
        self.eval_images = self._load_eval_images()

        (self.model, self.discriminator, self.optimizer, self.disc_optimizer, self.lr_scheduler,
         self.train_dataloader) = self.accelerator.prepare(
            self.model, self.discriminator, self.optimizer, self.disc_optimizer, self.lr_scheduler,
            self.train_dataloader,
        )
        # Accelerate's loader for streaming datasets (it dispatches batches from rank 0) drops the DataLoader's own
        # generator, so every new iterator (each epoch, and the one a resumed run starts with) would draw its worker
        # seed from the global torch RNG, which checkpoints save and the codebook restarts use: a resumed run would be
        # one draw off. Its own seeded generator keeps the global stream to the model, as for map-style datasets.
        base_loader = getattr(self.train_dataloader, "base_dataloader", self.train_dataloader)
        if base_loader.generator is None:
            base_loader.generator = torch.Generator().manual_seed(args.seed)
        if self.teacher is not None:
            self.teacher.to(self.accelerator.device)
        if self.loss_fn.perceptual is not None:
            self.loss_fn.perceptual.to(self.accelerator.device)
        self.ema = ParameterEMA(self._unwrap(self.model), args.ema_decay) if args.use_ema else None

        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers("evotok-tokenizer", config=_flat_config(args))
        self.resumed_from = None
        if args.resume_from_checkpoint:
            self._resume(args.resume_from_checkpoint)

    # ------------------------------------------------------------------ setup helpers
    def _build_model(self, overrides: dict) -> EvoTokModel:
        args = self.args
        if args.init_from:
            model = EvoTokModel.from_pretrained(args.init_from)
        elif args.encoder_pretrained:
            config = EvoTokConfig.from_preset(args.model_preset, **overrides)
            model = EvoTokModel.from_encoder_pretrained(args.encoder_pretrained, config=config)
        else:
            model = EvoTokModel(EvoTokConfig.from_preset(args.model_preset, **overrides))
        if args.attn_implementation is not None:
            model.set_attn_implementation(args.attn_implementation)
        return model

    def _build_train_dataloader(self):
        args = self.args
        if args.train_data == "bundled":
            dataset = bundled_photo_dataset("train", crops_per_photo=args.crops_per_photo, crop_size=args.crop_size,
                                            seed=args.seed)
        else:
            dataset = load_image_dataset(args.train_data, split="train", streaming=args.streaming,
                                         image_column=args.image_column)
        return make_dataloader(dataset, train_transform(self.processor), batch_size=args.train_batch_size,
                               shuffle=True, seed=args.seed, num_workers=args.num_workers)

    def _load_eval_images(self) -> torch.Tensor | None:
        args = self.args
        if not args.eval_data:
            return None
        if args.eval_data == "bundled":
            dataset = bundled_photo_dataset("validation", crop_size=args.crop_size, seed=args.seed)
        else:
            dataset = load_image_dataset(args.eval_data, split="validation", image_column=args.image_column)
        transform = eval_transform(self.processor)
        images = []
        for i, example in enumerate(dataset):
            if i >= args.eval_max_images:
                break
            images.append(transform(example["image"]))
        return torch.stack(images) if images else None

    def _unwrap(self, module):
        return self.accelerator.unwrap_model(module)

    # ------------------------------------------------------------------ checkpoints
    def _save_hook(self, models, weights, output_dir):
        if not self.accelerator.is_main_process:
            weights.clear()
            return
        for model in models:
            unwrapped = self._unwrap(model)
            if isinstance(unwrapped, EvoTokModel):
                unwrapped.save_pretrained(os.path.join(output_dir, "tokenizer"))
                self.processor.save_pretrained(os.path.join(output_dir, "tokenizer"))
            elif isinstance(unwrapped, PatchGANDiscriminator):
                unwrapped.save_pretrained(os.path.join(output_dir, "discriminator"))
        weights.clear()  # everything above is the model state: Accelerate must not write it again
        if self.ema is not None:
            os.makedirs(os.path.join(output_dir, "ema"), exist_ok=True)
            save_file(self.ema.shadow, os.path.join(output_dir, "ema", "model.safetensors"))
        with open(os.path.join(output_dir, "trainer_state.json"), "w") as f:
            json.dump({"global_step": self.global_step, **dataclasses.asdict(self.data_position)}, f)

    def _load_hook(self, models, input_dir):
        while models:
            model = self._unwrap(models.pop())
            if isinstance(model, EvoTokModel):
                state = load_file(os.path.join(input_dir, "tokenizer", "model.safetensors"))
                model.load_state_dict(state)
            elif isinstance(model, PatchGANDiscriminator):
                # The weights file is all a resume needs, so checkpoints of earlier versions (the same weights file
                # beside a hand-written config.json) resume too.
                model.load_state_dict(load_file(os.path.join(input_dir, "discriminator", "model.safetensors")))
        if self.ema is not None:
            self.ema.shadow = load_file(os.path.join(input_dir, "ema", "model.safetensors"))

    def save_checkpoint(self) -> str:
        """Write checkpoint-<step> atomically (temporary folder, then rename) and prune old ones."""
        folder = os.path.join(self.args.output_dir, "checkpoints")
        final = os.path.join(folder, f"{CHECKPOINT_PREFIX}{self.global_step}")
        partial = final + ".partial"
        if self.accelerator.is_main_process and os.path.exists(partial):
            shutil.rmtree(partial)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(partial)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune_checkpoints(folder)
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self, folder: str) -> None:
        limit = self.args.checkpoints_total_limit
        if not limit:
            return
        steps = sorted(
            int(m.group(1)) for n in os.listdir(folder) if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", n))
        )
        for step in steps[:-limit]:
            shutil.rmtree(os.path.join(folder, f"{CHECKPOINT_PREFIX}{step}"))

    def _resume(self, spec: str) -> None:
        path = latest_checkpoint(self.args.output_dir) if spec == "latest" else spec
        if path is None:
            logger.info("No complete checkpoint under %s: starting from scratch.", self.args.output_dir)
            return
        if not os.path.isdir(path):
            raise ValueError(f"resume_from_checkpoint: {path!r} is not a checkpoint folder")
        self.accelerator.load_state(path)
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        self.global_step = state["global_step"]
        if "epoch" in state:
            self.data_position = DataPosition(state["epoch"], state["batches_in_epoch"])
        else:  # written before checkpoints recorded the data position: by map-style runs, one batch per micro-step
            consumed = self.global_step * self.args.gradient_accumulation_steps
            self.data_position = DataPosition(*divmod(consumed, len(self.train_dataloader)))
        self.resumed_from = path
        logger.info("Resumed from %s at step %d", path, self.global_step)

    # ------------------------------------------------------------------ the loop
    def _teacher_features(self, pixel_values):
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(pixel_values.float())

    def train(self) -> dict:
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        model, disc = self.model, self.discriminator
        # The generator's adversarial term goes through the bare discriminator with its parameters frozen: the
        # generator backward then gives the discriminator no gradient (nothing to zero, nothing for its DDP
        # reducer to wait for); the discriminator step goes through the wrapped (synchronised) module.
        disc_bare = self._unwrap(disc)
        last_layer = self._unwrap(model).pixel_decoder.last_layer
        progress = tqdm(range(self.global_step, args.max_train_steps), disable=not accelerator.is_local_main_process,
                        desc="train", initial=0)
        # The loader gives batches from the checkpoint's data position on (Accelerate skips the ones already seen
        # without decoding them), and keeps the position up to date for the next checkpoint.
        batches = infinite_batches(self.train_dataloader, self.data_position, self.accelerator.skip_first_batches)
        history: list[dict] = []
        start_time, start_step = time.perf_counter(), self.global_step
        model.train()
        disc.train()
        while self.global_step < args.max_train_steps:
            batch = next(batches)
            pixel_values = batch["pixel_values"]
            gan_active = self.global_step >= args.disc_start and args.disc_weight > 0
            # ---- generator step
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    output = model(pixel_values)
                    logits_fake = None
                    if gan_active:
                        with _frozen(disc_bare):
                            logits_fake = disc_bare(output.reconstruction)
                    loss, terms = self.loss_fn.generator_loss(
                        output, pixel_values, self._teacher_features(pixel_values), logits_fake, self.global_step,
                        last_layer=last_layer if args.disc_adaptive_weight and gan_active else None,
                    )
                if not self._finite_everywhere(terms):
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            # ---- discriminator step (same batch, reconstructions detached)
            if gan_active:
                with accelerator.accumulate(disc):
                    with accelerator.autocast():
                        d_loss, d_terms = self.loss_fn.discriminator_loss(
                            disc(pixel_values.detach()), disc(output.reconstruction.detach()), self.global_step
                        )
                    if not self._finite_everywhere(d_terms):
                        continue
                    accelerator.backward(d_loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(disc.parameters(), args.max_grad_norm)
                    self.disc_optimizer.step()
                    self.disc_optimizer.zero_grad(set_to_none=True)
                terms.update(d_terms)
            if not accelerator.sync_gradients:
                continue
            self.global_step += 1
            progress.update(1)
            if self.ema is not None:
                self.ema.update(self._unwrap(model))
            if self.global_step % args.log_steps == 0 or self.global_step == args.max_train_steps:
                usage = output.codebook_usage.detach()
                pixel_depth = self._unwrap(model).config.pixel_depth
                logs = {k: float(v) for k, v in terms.items()}
                logs.update({
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "usage_pixel": float(usage[:pixel_depth].mean()),
                    "usage_all": float(usage.mean()),
                    "steps_per_s": (self.global_step - start_step) / max(time.perf_counter() - start_time, 1e-9),
                })
                accelerator.log(logs, step=self.global_step)
                progress.set_postfix(loss=f"{logs['total']:.4f}", rec=f"{logs['reconstruction']:.4f}",
                                     sem=f"{logs['semantic_cosine']:.3f}")
                history.append({"step": self.global_step, **logs})
            if args.eval_steps and self.global_step % args.eval_steps == 0:
                accelerator.log(self.evaluate(), step=self.global_step)
            if args.checkpointing_steps and self.global_step % args.checkpointing_steps == 0:
                self.save_checkpoint()
        progress.close()
        elapsed = time.perf_counter() - start_time
        summary = {"global_step": self.global_step, "train_seconds": elapsed,
                   "steps_per_s": (self.global_step - start_step) / max(elapsed, 1e-9), "history": history}
        if self.eval_images is not None:
            summary["eval"] = self.evaluate()
        accelerator.wait_for_everyone()
        return summary

    def _finite_everywhere(self, terms: dict) -> bool:
        """True when every loss term is finite on every rank. Otherwise raise (naming step and term) or, with
        on_nonfinite="skip", tell every rank to drop this step together."""
        local_ok = all(torch.isfinite(torch.as_tensor(v)).all() for v in terms.values())
        flag = torch.tensor([0.0 if local_ok else 1.0], device=self.accelerator.device)
        any_bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if not any_bad:
            self._skipped_in_a_row = 0
            return True
        if self.args.on_nonfinite == "raise":
            if not local_ok:
                check_finite(terms, self.global_step)
            raise FloatingPointError(f"non-finite loss on another rank at step {self.global_step}")
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row > self.args.max_consecutive_skips:
            raise FloatingPointError(
                f"non-finite loss in {self._skipped_in_a_row} consecutive batches at step {self.global_step}: giving up"
            )
        logger.warning("non-finite loss at step %d: skipping this batch on every rank", self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        return False

    @torch.no_grad()
    def evaluate(self) -> dict:
        """PSNR and SSIM of full reconstructions on the held-out images (the metrics of `evotok_hf.evaluation`, so
        the numbers logged in training are those its reports give)."""
        if self.eval_images is None:
            return {}
        model = self._unwrap(self.model)
        was_training = model.training
        model.eval()
        images = self.eval_images.to(self.accelerator.device)
        reconstructions = torch.cat([model(chunk).reconstruction.float() for chunk in images.split(16)])
        metrics = {"eval_psnr": float(psnr(reconstructions, images).mean()),
                   "eval_ssim": float(ssim(reconstructions, images).mean())}  # fmt: skip
        model.train(was_training)
        return metrics

    def export(self, path: str) -> str:
        """The final tokenizer as a `save_pretrained` folder (EMA weights when use_ema) with its image processor."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model = self._unwrap(self.model)
            if self.ema is not None:
                backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.ema.shadow}
                self.ema.copy_to(model)
            model.save_pretrained(path)
            self.processor.save_pretrained(path)
            if self.ema is not None:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in backup:
                            p.copy_(backup[n])
        self.accelerator.wait_for_everyone()
        return path

    def end(self) -> None:
        """Close trackers and wait for every rank (ending a gloo run right after destroy_process_group flakes)."""
        if self.args.report_to:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _flat_config(args: TokenizerTrainingArguments) -> dict:
    flat = {}
    for key, value in dataclasses.asdict(args).items():
        flat[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return {k: v for k, v in flat.items() if v is not None}


__all__ = [
    "TRAINING_PRESETS",
    "ParameterEMA",
    "TokenizerTrainer",
    "TokenizerTrainingArguments",
    "latest_checkpoint",
    "training_arguments_from_preset",
]
