"""The tiny "LoRA" the stand-in trains, its synthetic data, and kohya-style weight files."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

WIDTH = 32
RANK = 4
DATA_SEED = 1234  # the data never depends on --seed, like a fixed dataset on disk


class StandinLoRA(nn.Module):
    """A frozen base projection plus a trainable low-rank update (down then up)."""

    def __init__(self, width: int = WIDTH, rank: int = RANK) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(DATA_SEED + 1)
        self.register_buffer("base", torch.randn(width, width, generator=gen) / width**0.5)
        self.lora_down = nn.Linear(width, rank, bias=False)
        self.lora_up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.lora_up.weight)  # LoRA starts as the identity update, as kohya's does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base + self.lora_up(self.lora_down(x))


def make_dataset(num_samples: int, width: int = WIDTH) -> TensorDataset:
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(num_samples, width, generator=gen)
    target = torch.randn(width, width, generator=gen) / width**0.5
    return TensorDataset(x, x @ target)


def lora_tensors(model: StandinLoRA) -> dict[str, torch.Tensor]:
    """Weights under kohya LoRA key names, detached and contiguous for safetensors."""
    prefix = "lora_unet_standin"
    return {
        f"{prefix}.lora_down.weight": model.lora_down.weight.detach().cpu().contiguous(),
        f"{prefix}.lora_up.weight": model.lora_up.weight.detach().cpu().contiguous(),
        f"{prefix}.alpha": torch.tensor(float(RANK)),
    }


def save_lora(path: Path, model: StandinLoRA, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(model), str(path), metadata=metadata)
