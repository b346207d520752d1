"""RQ-VAE (as in LC-Rec): MLP encoder, residual quantizer with one codebook per level, MLP decoder.

Differences from the published code, each on purpose:
- inputs are standardised with the catalogue's mean and scale (see RQVAE.__init__);
- codebook sizes may differ per level;
- each level's codebook is initialised by k-means on the residuals of *all* items (LC-Rec used the
  first batch), level after level, so no level starts with codes far from the data.
Training lives in fit.py, Sinkhorn in sinkhorn.py.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError, IndexConfig
from .sinkhorn import sinkhorn_assign


def validate_index_config(cfg: IndexConfig) -> None:
    """ConfigError naming the first index.* key whose value cannot work."""
    checks = [
        ("codebook_sizes", 1 <= len(cfg.codebook_sizes) <= 26 and all(k >= 1 for k in cfg.codebook_sizes),
         "1 to 26 levels, each with at least one code"),
        ("hidden_dims", all(h >= 1 for h in cfg.hidden_dims), "positive widths"),
        ("code_dim", cfg.code_dim >= 1, ">= 1"),
        ("dropout", 0 <= cfg.dropout < 1, "in [0, 1)"),
        ("beta", cfg.beta >= 0, ">= 0"),
        ("kmeans_iters", cfg.kmeans_iters >= 0, ">= 0"),
        ("sinkhorn_epsilon", cfg.sinkhorn_epsilon >= 0, ">= 0 (0 turns Sinkhorn off)"),
        ("sinkhorn_iters", cfg.sinkhorn_iters >= 1, ">= 1"),
        ("reassign_rounds", cfg.reassign_rounds >= 0, ">= 0"),
        ("lr", cfg.lr > 0, "> 0"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("warmup_epochs", cfg.warmup_epochs >= 0, ">= 0"),
        ("max_epochs", cfg.max_epochs >= 1, ">= 1"),
        ("eval_every", cfg.eval_every >= 1, ">= 1"),
        ("patience", cfg.patience >= 1, ">= 1"),
        ("grad_clip", cfg.grad_clip >= 0, ">= 0 (0 turns clipping off)"),
        ("embed_batch_size", cfg.embed_batch_size >= 1, ">= 1"),
        ("collab_weight", cfg.collab_weight >= 0, ">= 0 (0 = text only)"),
        ("collab_dim", cfg.collab_dim >= 1, ">= 1"),
        ("collab_source", cfg.collab_source in ("svd", "sasrec"), '"svd" or "sasrec"'),
        ("collab_source", cfg.collab_source == "svd" or cfg.collab_weight > 0,
         "svd unless index.collab_weight > 0 (sasrec vectors need a weight)"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"index.{key} = {getattr(cfg, key)!r}: expected {want}")


def _mlp(dims: list[int], dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear layers with (BN), ReLU, (dropout) between them; the last layer is plain linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations; returns [k, d] centroids.

    With fewer distinct points than k, the spare centroids are copies of data points plus tiny noise,
    so every code is still a usable vector (it simply will not be picked by argmin).
    """
    n = x.shape[0]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids[0] = x[first]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        if total <= 0:        # every point already is a centroid: fill the rest near data points
            idx = torch.randint(n, (k - j,), generator=generator)
            noise = 1e-4 * torch.randn(k - j, x.shape[1], generator=generator, dtype=x.dtype)
            centroids[j:] = x[idx] + noise
            break
        pick = int(torch.multinomial(d2 / total, 1, generator=generator))
        centroids[j] = x[pick]
        d2 = torch.minimum(d2, ((x - centroids[j]) ** 2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype).unsqueeze(1)
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.allclose(moved, centroids):
            break
        centroids = moved
    return centroids


def sq_dist(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[B, K] squared Euclidean distances."""
    return (x.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * x @ codebook.T).clamp(min=0)


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, cfg: IndexConfig):
        super().__init__()
        self.cfg = cfg
        dims = [input_dim, *cfg.hidden_dims, cfg.code_dim]
        self.encoder = _mlp(dims, cfg.dropout, cfg.batch_norm)
        self.decoder = _mlp(dims[::-1], cfg.dropout, cfg.batch_norm)
        # inputs are standardised with statistics of the catalogue (set_input_stats): sentence vectors
        # share a large common direction, and without centring the encoder maps every item to nearly
        # the same latent. Recon MSE is then the share of input variance left unexplained.
        self.register_buffer("in_mean", torch.zeros(input_dim))
        self.register_buffer("in_scale", torch.ones(()))
        # uniform in +-1/K as LC-Rec's embedding init; init_codebooks (k-means) replaces it by default
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.empty(k, cfg.code_dim).uniform_(-1 / k, 1 / k)) for k in cfg.codebook_sizes)

    @property
    def num_levels(self) -> int:
        return len(self.codebooks)

    @torch.no_grad()
    def set_input_stats(self, x: torch.Tensor) -> None:
        self.in_mean.copy_(x.mean(0))
        self.in_scale.copy_((x - self.in_mean).pow(2).mean().sqrt().clamp(min=1e-12))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_scale

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """k-means of each level's codebook on that level's residuals of all the given items."""
        was_training = self.training
        self.eval()
        residual = self.encoder(self.normalise(x))
        for book in self.codebooks:
            book.copy_(kmeans(residual, book.shape[0], self.cfg.kmeans_iters, generator))
            residual = residual - book[sq_dist(residual, book).argmin(1)]
        self.train(was_training)

    def quantize(self, z: torch.Tensor, use_sinkhorn: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual quantization of latents z -> (quantized z, codes [B, L], quantization loss).

        The last level's codes come from Sinkhorn (uniform use of codes) when ``use_sinkhorn`` and
        ``sinkhorn_epsilon > 0``; every other choice is the nearest code.
        """
        residual, quantized = z, torch.zeros_like(z)
        codes, losses = [], []
        for level, book in enumerate(self.codebooks):
            d = sq_dist(residual, book)
            if use_sinkhorn and level == self.num_levels - 1 and self.cfg.sinkhorn_epsilon > 0:
                idx = sinkhorn_assign(d.detach(), self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iters)
            else:
                idx = d.argmin(1)
            q = book[idx]
            # codebook loss pulls codes to the (frozen) residuals; commitment keeps the encoder near codes
            losses.append(F.mse_loss(q, residual.detach()) + self.cfg.beta * F.mse_loss(residual, q.detach()))
            quantized = quantized + q
            residual = residual - q.detach()
            codes.append(idx)
        z_q = z + (quantized - z).detach()          # straight-through gradient to the encoder
        return z_q, torch.stack(codes, 1), torch.stack(losses).mean()

    def forward(self, x: torch.Tensor, use_sinkhorn: bool = True):
        """Raw vectors -> (reconstruction MSE in the standardised space, codes [B, L], quantisation loss)."""
        xn = self.normalise(x)
        z_q, codes, q_loss = self.quantize(self.encoder(xn), use_sinkhorn)
        return F.mse_loss(self.decoder(z_q), xn), codes, q_loss

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalise(x))

    @torch.no_grad()
    def greedy_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, L] by nearest code at every level, reconstruction MSE per item [N])."""
        xn = self.normalise(x)
        z_q, codes, _ = self.quantize(self.encoder(xn), use_sinkhorn=False)
        return codes, ((self.decoder(z_q) - xn) ** 2).mean(1)

    def codebook_arrays(self) -> list:
        return [b.detach().cpu().numpy().copy() for b in self.codebooks]
