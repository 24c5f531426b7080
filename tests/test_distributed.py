"""A real 2-process (gloo) DDP run: the codebooks must stay identical on both ranks through EMA updates and restarts.

DDP runs with broadcast_buffers=False, so it does not copy rank 0's buffers over the others each step: only the
quantizer's own all-reduce (statistics) and broadcast (restart vectors) can keep the codebooks equal. Each rank sees
different images. The frozen encoder parts must not trip DDP's unused-parameter check (find_unused_parameters=False).
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evotok_hf import EvoTokConfig, EvoTokModel


def _worker(rank: int, world: int, out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    # The ranks meet through a file, not a TCP port chosen in advance (which another process could take first); gloo
    # then opens its own connections on ports the system assigns.
    rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny", ema_warmup_steps=1)).train()
    initial_codebook = model.quantizer.codebook.detach().clone()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=False)
    optimizer = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
    data = torch.Generator().manual_seed(100 + rank)  # different images on each rank
    first_images = None
    for _ in range(steps):
        images = torch.rand(2, 3, 32, 32, generator=data) * 2 - 1
        out = ddp(images)
        first_images = images if first_images is None else first_images
        loss = out.reconstruction.square().mean() + out.semantic_features.square().mean() + out.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in model.quantizer.state_dict().items()}
    state["initial_codebook"] = initial_codebook
    state["first_images"] = first_images
    state["decoder_weight"] = model.pixel_decoder.conv_out.weight.detach().clone()
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_codebooks_identical_on_two_processes(tmp_path):
    steps = 4
    mp.spawn(_worker, args=(2, str(tmp_path), steps), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not torch.allclose(r0["first_images"], r1["first_images"]), "ranks should see different data"
    for key in ("codebook", "cluster_size_ema", "embed_ema", "ema_step", "decoder_weight"):
        assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
    assert int(r0["ema_step"]) == steps
    # restarts happened (every entry starts with count 0 < 1) and EMA updates moved the codebooks
    assert not torch.equal(r0["codebook"], r0["initial_codebook"])
    assert (r0["cluster_size_ema"] == 1.0).any()
