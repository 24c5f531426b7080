"""EvoTok's residual vector quantizer.

At depth d the current residual is replaced by its nearest (squared L2) entry of codebook d, that entry is
subtracted from the residual and added to the running sum. The running sum after `pixel_depth` depths is the pixel
latent, after `semantic_depth` depths the semantic latent; both reach the encoder through a straight-through estimator.
Either depth may be the larger one (the paper's Table 4: (4, 4), (16, 4), (4, 16)): the cascade runs
`num_depths = max(pixel_depth, semantic_depth)` depths, one codebook each.
Codebooks are not trained by gradients: they follow exponential moving averages of the vectors assigned to them
(VQ-VAE-2 style), and entries whose EMA count drops below one are restarted from vectors of the current batch.

References: EvoTok (arXiv 2603.12108) and the authors' `SharedResidualQuantizer`; RQ-VAE (Lee et al., 2022).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class ResidualQuantizerOutput:
    """What one pass of the residual quantizer returns.

    pixel_latents / semantic_latents: (..., codebook_dim) partial sums after `pixel_depth` / `semantic_depth` depths,
        straight-through (their gradient flows to the input unchanged).
    codes: (..., num_depths) int64 indices, one per depth.
    commitment_loss: mean over all num_depths depths d of mean((x - sg(partial_sum_d))**2).
    codebook_usage: (num_depths,) fraction of each codebook's entries chosen in this batch (all ranks in training).
    perplexity: (num_depths,) exp(entropy) of each depth's code histogram in this batch.
    """

    pixel_latents: torch.Tensor
    semantic_latents: torch.Tensor
    codes: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_usage: torch.Tensor
    perplexity: torch.Tensor


class EvoTokResidualQuantizer(nn.Module):
    """Residual VQ with one EMA codebook per depth, stored stacked as `codebook` (num_depths, codebook_size,
    codebook_dim), where `num_depths = max(pixel_depth, semantic_depth)`.

    The codebook, the EMA statistics `cluster_size_ema` / `embed_ema` and the step counter `ema_step` are persistent
    buffers, as in vector-quantize-pytorch's EMA codebooks: they are state that the EMA updates, not weights that
    gradients train, so no optimizer, FSDP / ZeRO sharding or `requires_grad` bookkeeping ever sees them, while
    `state_dict` (hence a saved checkpoint, which resumes exactly) holds them under their usual names. The float ones
    are created fp32 whatever the default dtype, so a model built or loaded in bf16 / fp16 keeps them fp32 also when
    they are missing from a checkpoint (loaded ones are kept fp32 by `_keep_in_fp32_modules_strict`).
    """

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        pixel_depth: int,
        semantic_depth: int,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        restart_unused_codes: bool = True,
        ema_warmup_steps: int = 0,
        search_chunk_size: int | None = None,
        search_workers: int | None = None,
    ):
        super().__init__()
        for name, value in (("pixel_depth", pixel_depth), ("semantic_depth", semantic_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvoTokResidualQuantizer: `{name}` must be an integer >= 1, got {value!r}.")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.pixel_depth = pixel_depth
        self.semantic_depth = semantic_depth
        self.num_depths = max(pixel_depth, semantic_depth)
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.restart_unused_codes = restart_unused_codes
        self.ema_warmup_steps = ema_warmup_steps
        self.search_chunk_size = search_chunk_size
        self.search_workers = search_workers

        codebook = torch.randn(self.num_depths, codebook_size, codebook_dim, dtype=torch.float32)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size_ema", torch.zeros(self.num_depths, codebook_size, dtype=torch.float32))
        self.register_buffer("embed_ema", codebook.clone())
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, config) -> "EvoTokResidualQuantizer":
        return cls(
            codebook_size=config.codebook_size,
            codebook_dim=config.codebook_dim,
            pixel_depth=config.pixel_depth,
            semantic_depth=config.semantic_depth,
            ema_decay=config.ema_decay,
            ema_epsilon=config.ema_epsilon,
            restart_unused_codes=config.restart_unused_codes,
            ema_warmup_steps=config.ema_warmup_steps,
            search_chunk_size=config.search_chunk_size,
        )

    # ------------------------------------------------------------------ search
    # Distance block budgets: on CPU a block that stays in cache (the distance writes, not the flops, dominate a GEMM
    # whose inner dimension is only `codebook_dim`), shared by the workers; on accelerators a block large enough to
    # keep the device busy.
    _CPU_BLOCK_BYTES = 8 * 2**20
    _ACCELERATOR_BLOCK_BYTES = 256 * 2**20

    def _search_workers(self, device: torch.device) -> int:
        if device.type != "cpu":
            return 1
        return self.search_workers if self.search_workers is not None else torch.get_num_threads()

    def _search_rows(self, device: torch.device) -> int:
        if self.search_chunk_size is not None:
            return self.search_chunk_size
        if device.type != "cpu":
            return max(1, self._ACCELERATOR_BLOCK_BYTES // (4 * self.codebook_size))
        return max(1, self._CPU_BLOCK_BYTES // (4 * self.codebook_size * self._search_workers(device)))

    @torch.no_grad()
    def search(self, vectors: torch.Tensor) -> torch.Tensor:
        """The residual search of `vectors` (N, codebook_dim): codes (N, num_depths), at each depth the exact
        nearest entry (squared L2, first index on ties) of that depth's codebook to the residual left by the depths
        before. fp32 whatever the autocast state.

        The rows are cut into blocks of `search_chunk_size` (by default as many as keep 8 MiB of distances on CPU,
        shared by the workers, 256 MiB on accelerators), and each block runs through all depths on its own, in one
        reused distance buffer, so the extra memory does not grow with N. ||v||^2 is constant per row and left out of
        the argmin; ||c||^2 enters as addmm's bias, so each block and depth is one GEMM and one argmin.

        On a CPU the blocks go to a pool of `search_workers` single-threaded workers (by default
        `torch.get_num_threads()`), each taking the next block when it finishes one. A multi-threaded GEMM per block
        would make every one of the N / rows x depths small GEMMs a parallel region whose threads wait for each
        other: on a machine shared with other busy processes, a descheduled thread stalls them all (the search ran
        at 1.1-2.6x the authors' algorithm instead of 7x there; `benchmarks/README.md`). Independent blocks keep
        the cores that are free busy.
        """
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            vectors = vectors.float()
            codebooks = self.codebook.float()
            codebooks_t = codebooks.transpose(1, 2)
            codebooks_sq = codebooks.pow(2).sum(dim=2)
            codes = torch.empty(vectors.shape[0], self.num_depths, dtype=torch.long, device=vectors.device)
            rows = min(self._search_rows(vectors.device), max(vectors.shape[0], 1))
            starts = range(0, vectors.shape[0], rows)
            workers = min(self._search_workers(vectors.device), len(starts))
            buffers = threading.local()

            def search_block(start: int) -> None:
                distances = getattr(buffers, "distances", None)
                if distances is None:
                    distances = buffers.distances = vectors.new_empty(rows, self.codebook_size)
                residual = vectors[start : start + rows].clone()
                out = distances[: residual.shape[0]]
                for depth in range(self.num_depths):
                    torch.addmm(codebooks_sq[depth], residual, codebooks_t[depth], alpha=-2.0, out=out)
                    idx = self._first_argmin(out)
                    codes[start : start + rows, depth] = idx
                    residual.sub_(codebooks[depth].index_select(0, idx))

            if workers <= 1:
                for start in starts:
                    search_block(start)
                return codes
            threads = torch.get_num_threads()
            try:
                # torch.set_num_threads in a worker sets that thread's OpenMP team size (the caller keeps its own) and
                # the default for threads not yet started, restored below
                with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                    list(pool.map(torch.no_grad()(search_block), starts))
            finally:
                torch.set_num_threads(threads)
        return codes

    def _first_argmin(self, distances: torch.Tensor) -> torch.Tensor:
        """`distances.argmin(dim=1)` (first index on ties) as a two-level reduction: the minimum of each group of
        columns (a vectorised `amin`), the first group holding the row minimum, then the first position inside that
        group. Identical result; several times faster on CPU, where `argmin` over 32k columns is not vectorised and
        cost as much as the GEMM itself."""
        group = self._argmin_group
        if group is None:
            return distances.argmin(dim=1)
        grouped = distances.view(distances.shape[0], -1, group)
        best_group = grouped.amin(dim=2).argmin(dim=1)
        rows = torch.arange(distances.shape[0], device=distances.device)
        return best_group * group + grouped[rows, best_group].argmin(dim=1)

    @property
    def _argmin_group(self) -> int | None:
        # the largest power of two <= 256 dividing the codebook size; small or odd sizes use plain argmin
        group = 256
        while group >= 16 and self.codebook_size % group:
            group //= 2
        return group if group >= 16 and self.codebook_size > group else None

    # ------------------------------------------------------------------ forward
    def forward(self, latents: torch.Tensor) -> ResidualQuantizerOutput:
        """Quantise channel-last latents (..., codebook_dim). EMA updates happen only in training mode."""
        if latents.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"EvoTokResidualQuantizer: last dim of the latents must be codebook_dim={self.codebook_dim}, "
                f"got shape {tuple(latents.shape)}."
            )
        if not latents.is_floating_point():
            raise ValueError(f"EvoTokResidualQuantizer: latents must be floating point, got {latents.dtype}.")
        lead_shape = latents.shape[:-1]
        with torch.autocast(device_type=latents.device.type, enabled=False):
            x = latents.float().reshape(-1, self.codebook_dim)
            residual = x.detach().clone()
            partial_sum = torch.zeros_like(residual)
            # every depth's codebook changes (EMA) only after its own search, so all codes can be searched first
            codes = self.search(residual)
            usage = x.new_empty(self.num_depths)
            perplexity = x.new_empty(self.num_depths)
            commitment = x.new_zeros(())
            update = self.training and self._all_finite(x)
            for depth in range(self.num_depths):
                idx = codes[:, depth]
                chosen = self.codebook[depth].float().index_select(0, idx)
                counts = self._code_counts(idx, residual, depth, update)
                residual.sub_(chosen)
                partial_sum = partial_sum + chosen  # not in place: the commitment term below keeps it for backward
                commitment = commitment + F.mse_loss(x, partial_sum)
                usage[depth] = (counts > 0).float().mean()
                probs = counts / counts.sum().clamp(min=1)
                perplexity[depth] = torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())
                if depth == self.pixel_depth - 1:
                    pixel = partial_sum
                if depth == self.semantic_depth - 1:
                    semantic = partial_sum
            if update:
                self.ema_step.add_(1)
            # Straight-through: forward value = quantised sum, gradient = identity to the encoder output.
            pixel = x + (pixel - x).detach()
            semantic = x + (semantic - x).detach()
        out_dtype = latents.dtype
        return ResidualQuantizerOutput(
            pixel_latents=pixel.reshape(*lead_shape, self.codebook_dim).to(out_dtype),
            semantic_latents=semantic.reshape(*lead_shape, self.codebook_dim).to(out_dtype),
            codes=codes.reshape(*lead_shape, self.num_depths),
            commitment_loss=commitment / self.num_depths,
            codebook_usage=usage,
            perplexity=perplexity,
        )

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def _all_finite(self, x: torch.Tensor) -> bool:
        """Whether every rank's latents are finite. A non-finite batch (a diverging step that the training loop will
        reject or skip) must not reach the EMA statistics, which no optimizer step can undo; all ranks agree so they
        keep identical codebooks."""
        finite = torch.isfinite(x).all().to(torch.int32).reshape(1)
        if _distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    @torch.no_grad()
    def _code_counts(self, idx: torch.Tensor, residual: torch.Tensor, depth: int, update: bool) -> torch.Tensor:
        """Histogram of the chosen codes; in training also the EMA update of codebook `depth` (all ranks summed)."""
        counts = torch.bincount(idx, minlength=self.codebook_size).float()
        if not update:
            return counts
        sums = residual.new_zeros(self.codebook_size, self.codebook_dim).index_add_(0, idx, residual)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self._ema_update(depth, counts, sums, residual)
        return counts

    @torch.no_grad()
    def _ema_update(self, depth: int, counts: torch.Tensor, sums: torch.Tensor, residual: torch.Tensor) -> None:
        """One EMA step of codebook `depth` from this step's (global) assignment counts and vector sums.

        - the cluster-size EMA always updates;
        - past the warm-up, the vector-sum EMA updates and the codebook becomes sum_ema / smoothed_size (sizes
          clamped to >= 1, as the authors do); during the warm-up the codebook stays put and the sum EMA is kept equal
          to codebook * smoothed_size, so EMA updates continue smoothly when the warm-up ends (the authors' code
          instead divides a stale sum EMA by the growing sizes, and never updates it when warm-up is 0);
        - entries whose size EMA is < 1 are restarted from random vectors of this step (drawn on rank 0 and
          broadcast) with their size reset to 1.
        """
        decay = self.ema_decay
        cluster_size = self.cluster_size_ema[depth]
        embed_sum = self.embed_ema[depth]
        codebook = self.codebook[depth]
        cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        warming_up = int(self.ema_step) < self.ema_warmup_steps
        if not warming_up:
            embed_sum.mul_(decay).add_(sums, alpha=1 - decay)

        dead = None
        if self.restart_unused_codes:
            dead = cluster_size < 1.0
            num_dead = int(dead.sum())
            if num_dead > 0:
                replacements = self._replacement_vectors(residual, num_dead)
                cluster_size[dead] = 1.0
                (codebook if warming_up else embed_sum)[dead] = replacements.to(codebook.dtype)

        total = cluster_size.sum()
        smoothed = (total * (cluster_size + self.ema_epsilon) / (total + self.codebook_size * self.ema_epsilon)).clamp(
            min=1.0
        )
        if warming_up:
            embed_sum.copy_(codebook.float() * smoothed[:, None])
        else:
            codebook.copy_(embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _replacement_vectors(self, residual: torch.Tensor, num: int) -> torch.Tensor:
        """`num` random rows of this step's residuals, identical on every rank (drawn on rank 0, then broadcast)."""
        if _distributed() and dist.get_rank() != 0:
            out = residual.new_empty(num, self.codebook_dim)
        else:
            pool = residual
            if pool.shape[0] < num:
                # Too few vectors: tile them with a little noise so restarted entries are not exact duplicates.
                repeats = -(-num // pool.shape[0])
                pool = pool.repeat(repeats, 1)
                pool = pool + torch.rand_like(pool) * (0.01 / self.codebook_dim**0.5)
            out = pool[torch.randperm(pool.shape[0], device=pool.device)[:num]].contiguous()
        if _distributed():
            dist.broadcast(out, src=0)
        return out

    # ------------------------------------------------------------------ codes -> vectors
    def validate_codes(self, codes: torch.Tensor, max_depth: int | None = None, limit: str = "num_depths") -> None:
        """Raise ValueError unless `codes` is an int64 tensor (..., k) with 1 <= k <= max_depth (by default
        `num_depths`, every codebook) and codes in range; `limit` names where max_depth comes from in the message."""
        max_depth = self.num_depths if max_depth is None else max_depth
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a torch.Tensor of int64, got {type(codes).__name__}.")
        if codes.dtype != torch.long:
            raise ValueError(f"codes must have dtype torch.int64, got {codes.dtype}.")
        if codes.ndim < 1 or not 1 <= codes.shape[-1] <= max_depth:
            raise ValueError(
                f"codes must have shape (..., k) with 1 <= k <= {max_depth} depths ({limit}), got shape "
                f"{tuple(codes.shape)}."
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got values in [{int(codes.min())}, {int(codes.max())}]."
            )

    def embed_codes(self, codes: torch.Tensor, return_cumulative: bool = False) -> torch.Tensor:
        """Sum of the code embeddings of the first k depths, for int64 codes (..., k).

        Returns (..., codebook_dim) in fp32, or with `return_cumulative=True` the running sums after each depth,
        (..., k, codebook_dim).
        """
        self.validate_codes(codes)
        return self.lookup_codes(codes, return_cumulative)

    def lookup_codes(self, codes: torch.Tensor, return_cumulative: bool = False) -> torch.Tensor:
        """`embed_codes` without checking the codes (no host synchronisation: a decoding step that runs on a device
        or under `torch.compile` calls this on codes it chose itself)."""
        depth = codes.shape[-1]
        flat_codebook = self.codebook[:depth].reshape(depth * self.codebook_size, self.codebook_dim)
        # Row d * codebook_size + c of the flattened codebook is entry c of depth d: one gather for all depths.
        offsets = torch.arange(depth, device=codes.device) * self.codebook_size
        embeddings = F.embedding(codes + offsets, flat_codebook).float()
        return embeddings.cumsum(dim=-2) if return_cumulative else embeddings.sum(dim=-2)


__all__ = ["EvoTokResidualQuantizer", "ResidualQuantizerOutput"]
