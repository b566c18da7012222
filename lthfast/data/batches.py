"""Minibatch order and augmentation, stateless in the iteration number so that a resumed run sees the same data."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchSampler:
    """Indices of the minibatch at any training iteration.

    Epoch ``e`` is a permutation of ``n`` examples drawn from a generator seeded with (seed, e); iteration ``it``
    takes batch ``it % steps_per_epoch`` of epoch ``it // steps_per_epoch``. The last incomplete batch of an
    epoch is dropped. Because nothing depends on earlier calls, resuming at iteration ``it`` reproduces the
    uninterrupted order exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size < 1 or batch_size > n:
            raise ValueError(f"batch size {batch_size} must be between 1 and the {n} training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def indices(self, iteration: int) -> torch.Tensor:
        """int64 [batch_size] CPU indices for ``iteration``."""
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=generator)
            self._epoch = epoch
        return self._perm[step * self.batch_size : (step + 1) * self.batch_size]


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops (zero padding ``pad``) and horizontal flips of images x [B, C, H, W]; returns a new tensor.

    The CIFAR augmentation of the lottery-ticket papers. Offsets and flips are drawn on the CPU from ``generator``
    and applied with one gather on x's device.
    """
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = torch.arange(w, device=x.device)[None, :].expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    cols = cols[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]
