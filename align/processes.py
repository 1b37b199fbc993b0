"""Which process this is: the one source of truth for rank decisions.

align runs as one process, or as N under `torchrun` / `accelerate launch`, each a rank of one process group (NCCL on
GPUs, gloo on CPUs). accelerate's PartialState is that truth for align and for the trainers alike (it is shared);
`state()` creates it before any model or trainer exists, as the trainers need it: with cpu=True on a machine
without CUDA (or with ACCELERATE_USE_CPU=1), without which N CPU processes would each see a world of one, each
believe it is the main process, and all write the same run dir.
"""

from __future__ import annotations

import os

from align.errors import AlignError


class LaunchError(AlignError, RuntimeError):
    """Processes were launched together but do not form one process group."""


def state():
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    shared = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != shared.num_processes:
        raise LaunchError(
            f"this process was launched as one of {launched} (WORLD_SIZE), but accelerate sees {shared.num_processes} "
            "in its process group: each would train alone, and all would write the same run dir. On CPUs launch "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m align ...`; on GPUs `accelerate launch "
            "--config_file accelerate_config.yaml -m align ...` (README: Several processes)")
    return shared


def is_main_process() -> bool:
    return state().is_main_process


def wait_for_everyone() -> None:
    state().wait_for_everyone()


def rank_checksums(model) -> list[float]:
    """A checksum of `model`'s trainable weights from every rank (one per process, in rank order), for the check
    that data-parallel training left all ranks with the same weights."""
    import torch

    total = sum(p.detach().double().abs().sum() + p.detach().double().sum() for p in model.parameters()
                if p.requires_grad)
    shared = state()
    value = torch.tensor([float(total)], dtype=torch.float64, device=shared.device)
    if shared.num_processes == 1:
        return [value.item()]
    from accelerate.utils import gather

    return gather(value).tolist()


def check_identical(model, stage: str) -> list[float]:
    """Raises if the ranks hold different trainable weights (a rank trained alone); returns the checksums."""
    checksums = rank_checksums(model)
    if len(set(checksums)) > 1:
        raise LaunchError(f"{stage}: the {len(checksums)} processes hold different trainable weights (checksums "
                          f"{checksums}): training was not data-parallel, so no checkpoint is written")
    return checksums


def in_shares(items, work):
    """`work(share)` on this process's share of `items` (all of them when there is one process); every process
    gets the results for all items, in order. `work` returns a list, or a tuple of lists."""
    shared = state()
    with shared.split_between_processes(list(items)) as share:  # a list: a datasets Column would not be split
        result = work(share)
    if shared.num_processes == 1:
        return result
    from accelerate.utils import gather_object

    return tuple(gather_object(part) for part in result) if isinstance(result, tuple) else gather_object(result)
