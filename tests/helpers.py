"""Helpers shared by several test packages."""
import socket

import torch


def randomize_adapters(model, seed=0, std=0.05):
    """Non-zero adapter weights (every parameter that requires grad), so merges act on a real update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def free_port() -> int:
    """A free local TCP port for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
