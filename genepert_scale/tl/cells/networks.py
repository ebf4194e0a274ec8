"""The cell model's networks (torch): a VAE on log-normalised expression and
the shift head ``f(z, c_p) → Δz``, their training loops, and a context that
makes torch deterministic for a seed.

Notes
-----
VAE: an MLP encoder gives ``(μ, log σ²)`` of a ``latent_dim`` Gaussian, an MLP
decoder maps ``z`` back to log-expression; the loss per cell is the squared
error summed over genes plus ``beta`` times the KL divergence to ``N(0, I)``.

Shift head, with ``c = W g`` a learned linear projection of the L2-normalised
embedding ``g`` of the perturbation and ``h₁ = σ(A z + a)``:

* ``additive``: ``h = h₁ + c`` (``c`` of the hidden width);
* ``film``: ``h = h₁ ⊙ (1 + γ) + β`` with ``(γ, β) = c`` (twice the width);
* ``concat``: ``h = σ(A [z; c] + a)`` (``c`` of ``condition_dim``);

then ``Δz = B σ(M h + m)``. ``B`` starts at zero, so the untrained head
predicts no shift. A one-hot head (``n_conditions``) replaces ``W g`` by a
learned vector per perturbation (an embedding table indexed by the
perturbation's number): the condition of ``latent_ot_onehot``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn

Injection = Literal["additive", "film", "concat"]
INJECTIONS: tuple[str, ...] = ("additive", "film", "concat")
#: Rows per batch when encoding or decoding without gradients.
INFERENCE_ROWS = 4096


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int | None = None) -> Iterator[None]:
    """Seed torch, make it use deterministic algorithms and, when given,
    ``threads`` CPU threads; restore all three afterwards (the global random
    state included)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(was_threads)


class Vae(nn.Module):
    """A Gaussian VAE on log-expression (see the module's Notes)."""

    def __init__(self, n_genes: int, latent_dim: int = 32, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_genes, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU())
        self.mu = nn.Linear(hidden, latent_dim)
        self.log_var = nn.Linear(hidden, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, n_genes))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.log_var(h).clamp(-10.0, 10.0)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mu, log_var = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return self.decoder(mu + noise * torch.exp(0.5 * log_var)), mu, log_var


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Mean over cells of the squared error (summed over genes) + ``beta`` KL."""
    error = (recon - x).pow(2).sum(dim=1)
    kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(dim=1)
    return (error + beta * kl).mean()


class ShiftHead(nn.Module):
    """``f(z, c_p) → Δz`` with the condition injected as ``injection`` says;
    ``c_p`` a projection of an embedding row, or with ``n_conditions`` a
    learned vector per condition number (``embedding_dim`` is then unused)."""

    def __init__(self, latent_dim: int, embedding_dim: int, *, hidden: int = 128,
                 condition_dim: int = 32, injection: Injection = "additive",
                 n_conditions: int | None = None):
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"injection {injection!r}: use one of {', '.join(INJECTIONS)}")
        self.injection = injection
        width = {"additive": hidden, "film": 2 * hidden, "concat": condition_dim}[injection]
        self.condition = (nn.Embedding(n_conditions, width) if n_conditions
                          else nn.Linear(embedding_dim, width))
        self.first = nn.Linear(latent_dim + (condition_dim if injection == "concat" else 0), hidden)
        self.middle = nn.Linear(hidden, hidden)
        self.last = nn.Linear(hidden, latent_dim)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)
        self.act = nn.SiLU()

    def forward(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        c = self.condition(embedding)
        if self.injection == "concat":
            h = self.act(self.first(torch.cat([z, c], dim=1)))
        elif self.injection == "additive":
            h = self.act(self.first(z)) + c
        else:
            gamma, beta = c.chunk(2, dim=1)
            h = self.act(self.first(z)) * (1.0 + gamma) + beta
        return self.last(self.act(self.middle(h)))


def train_vae(
    vae: Vae,
    epochs: int,
    batches: Callable[[int], Iterable[np.ndarray]],
    *,
    learning_rate: float,
    beta: float,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """Train ``vae`` for ``epochs`` passes of ``batches(epoch)``; the mean
    loss of every epoch."""
    optimiser = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    vae.train()
    history = []
    for epoch in range(epochs):
        total, cells = 0.0, 0
        for batch in batches(epoch):
            x = torch.from_numpy(batch).to(device)
            recon, mu, log_var = vae(x, generator)
            loss = vae_loss(recon, x, mu, log_var, beta)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
            cells += len(batch)
        history.append(total / max(cells, 1))
    vae.eval()
    return history


def train_head(
    head: ShiftHead,
    z: np.ndarray,
    shift: np.ndarray,
    condition: np.ndarray,
    embeddings: np.ndarray | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    rng: np.random.Generator,
    device: torch.device,
) -> list[float]:
    """Fit ``head(z, embeddings[condition]) ≈ shift`` (a one-hot head:
    ``head(z, condition)``, ``embeddings`` ``None``) by minibatch AdamW on
    the squared error; the mean loss of every epoch."""
    z_t, shift_t = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
                    for a in (z, shift))
    condition_t = torch.from_numpy(condition.astype(np.int64)).to(device)
    if embeddings is not None:
        condition_t = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(
            device)[condition_t]
    optimiser = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    head.train()
    history = []
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(z))).to(device)
        total = 0.0
        for first in range(0, len(z), batch_size):
            rows = order[first : first + batch_size]
            predicted = head(z_t[rows], condition_t[rows])
            loss = (predicted - shift_t[rows]).pow(2).sum(dim=1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        history.append(total / len(z))
    head.eval()
    return history


@torch.no_grad()
def encode(vae: Vae, x: np.ndarray, device: torch.device) -> np.ndarray:
    """The latent means ``μ`` of cells (rows of ``x``)."""
    parts = [vae.encode(torch.from_numpy(np.ascontiguousarray(x[i : i + INFERENCE_ROWS])).to(device))[0]
             for i in range(0, len(x), INFERENCE_ROWS)]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros((0, vae.mu.out_features), np.float32)


@torch.no_grad()
def decode(vae: Vae, z: np.ndarray, device: torch.device) -> np.ndarray:
    """Decoded log-expression of latents (rows of ``z``)."""
    parts = [vae.decoder(torch.from_numpy(np.ascontiguousarray(z[i : i + INFERENCE_ROWS],
                                                              dtype=np.float32)).to(device))
             for i in range(0, len(z), INFERENCE_ROWS)]
    return torch.cat(parts).cpu().numpy()


@torch.no_grad()
def apply_head(head: ShiftHead, z: np.ndarray, embedding: np.ndarray, device: torch.device) -> np.ndarray:
    """``f(z, c_p)`` for latents ``z`` and one embedding row (or one per
    row); for a one-hot head, one condition number (or one per row)."""
    z_t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(device)
    if isinstance(head.condition, nn.Embedding):
        g = np.broadcast_to(np.asarray(embedding, dtype=np.int64), (len(z),))
    else:
        g = np.broadcast_to(np.asarray(embedding, dtype=np.float32),
                            (len(z), head.condition.in_features))
    return head(z_t, torch.from_numpy(np.ascontiguousarray(g)).to(device)).cpu().numpy()
