"""Several training processes (`accelerate launch`, torchrun): what they exchange besides DDP's own traffic.

LoRA layers hook into the frozen modules, outside DDP's forward, so the loop averages their gradients itself;
processes agree on stopping after the same step; weights are compared before every save."""

from __future__ import annotations

import logging

import torch

from lorakit.errors import LorakitError
from lorakit.train.interrupt import StopRequest

logger = logging.getLogger(__name__)


def average_gradients(params: list[torch.Tensor], num_processes: int) -> None:
    """Sum each LoRA gradient over the processes and divide by their number."""
    if num_processes == 1:
        return
    for param in params:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
            param.grad /= num_processes


def stop_requested(stop: StopRequest, world: int, device) -> bool:
    """Whether any process was asked to stop (all processes must stop after the same step)."""
    if world == 1:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def check_in_sync(params: list[torch.Tensor], log: bool) -> None:
    """Every process must hold the same LoRA weights (same initial weights, averaged gradients); a difference
    means a broken set-up, so it stops the run instead of saving one process's weights as the result."""
    checksum = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                            for p in params]).flatten().cpu()
    checksums = all_gather(checksum)
    if not all(torch.equal(checksums[0], other) for other in checksums[1:]):
        raise LorakitError("the LoRA weights differ between processes; check that every process runs the same "
                           "lorakit, flags and data")
    if log:
        logger.info("LoRA weights identical on all %d processes (checksum %.17g)", len(checksums),
                    float(checksum.sum()))


def all_reduce_sum(values: list[float], device) -> list[float]:
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(sums)
    return sums.tolist()


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `tensor` (same shape everywhere), in rank order, on the CPU."""
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    tensor = tensor.to(device)
    gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, tensor)
    return [t.cpu() for t in gathered]
