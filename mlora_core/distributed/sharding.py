"""``distributed.shard_base``: the frozen base's decoder blocks sharded over the ranks with FSDP2.

Each block is its own ``fully_shard`` unit: its weights live in shards, one per rank, and
are gathered just before the block runs (forward, and backward where the gradient flows
through it) and freed after. The embeddings, the final norm and the LM head stay whole on
every rank. Adapters are attached after sharding, so FSDP2 does not manage them: they stay
whole, fp32 and replicated, and the ``rows`` strategy sums their gradients itself.

Because every block's weights are gathered by a collective, every rank must run every
forward and backward of the step and every held-out evaluation, in the same order; the
engine makes sure of that when :attr:`Strategy.collective_forward` is set.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mlora_core.distributed.world import World
from mlora_core.errors import MloraError


def shard_blocks(blocks: Sequence[nn.Module] | None, world: World, device: str) -> int:
    """Shard each block over every rank; returns how many blocks were sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not blocks:
        raise MloraError(
            "distributed.shard_base: the backend does not name its transformer blocks (LoadedModel.blocks)"
        )
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return len(blocks)
