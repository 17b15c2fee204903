"""Helpers shared by several test packages."""
import torch


def randomize_adapters(model, seed=0, std=0.05):
    """Non-zero adapter weights (every parameter that requires grad), so merges act on a real update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
