"""Reading and writing a parameter whole, whatever engine holds it: a plain tensor (single process, DDP, ZeRO-2), a
ZeRO-3 partition (DeepSpeed `ds_id` parameters) or an FSDP2 shard (`DTensor`).

Under ZeRO-3 and FSDP2 both are collectives: every rank must make the same calls in the same order.
"""

from contextlib import contextmanager

import torch


def is_zero3_parameter(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@contextmanager
def gathered(parameters: list[torch.Tensor], modifier_rank: int | None = None):
    """ZeRO-3 partitioned `parameters` gathered whole inside the context (a no-op for other tensors). Changes made on
    `modifier_rank` are kept."""
    partitioned = [p for p in parameters if is_zero3_parameter(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def read_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of `tensor` as a plain tensor (the tensor itself, detached, when it is not sharded)."""
    if _is_dtensor(tensor):
        return tensor.full_tensor()
    if is_zero3_parameter(tensor):
        with gathered([tensor]):
            return tensor.detach().clone()
    return tensor.detach()


@torch.no_grad()
def write_full(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite `tensor` with the whole `value` (every rank passes the same value)."""
    if _is_dtensor(tensor):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value.to(device=tensor.device, dtype=tensor.dtype), tensor.device_mesh,
                                  tensor.placements).to_local()
        tensor.to_local().copy_(local)
        return
    with gathered([tensor], modifier_rank=0):
        tensor.data.copy_(value.to(device=tensor.device, dtype=tensor.dtype))


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor (a ZeRO-3 partition reports its own, empty, shape)."""
    return tensor.ds_shape if is_zero3_parameter(tensor) else tensor.shape


@torch.no_grad()
def write_rows(tensor: torch.Tensor, rows: dict[int, torch.Tensor]) -> None:
    """Overwrite rows `tensor[i]` with `rows[i]`: in place for a plain tensor, through the whole value otherwise."""
    if not rows:
        return
    if not (_is_dtensor(tensor) or is_zero3_parameter(tensor)):
        for index, value in rows.items():
            tensor.data[index].copy_(value.to(device=tensor.device, dtype=tensor.dtype))
        return
    whole = read_full(tensor).clone()
    for index, value in rows.items():
        whole[index].copy_(value.to(whole.dtype))
    write_full(tensor, whole)
