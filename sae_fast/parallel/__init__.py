"""The parallel part: a dictionary sharded by latents across a torch.distributed group, exact.

- row_shards: tensors split by rows across safetensors files with an index (an SAE's or a
  training state's shards, written by the process that holds them, read in any split);
- ops: the sparse ops over latent shards (the exact merge of the shards' local top-k);
- sae: ShardedSparseAutoencoder, one process's block of latents;
- layout: a run's data-parallel x latent-parallel process groups, collectives, and folders
  every rank writes.
The names below import on first use (sae_fast.lazy); row_shards needs only the foundation.
"""

from ..lazy import exports

_EXPORTS = {
    "Layout": ".layout",
    "ShardedSparseAutoencoder": ".sae",
    "shard_range": ".ops",
    "sharded_decode": ".ops",
    "sharded_encode_topk": ".ops",
    "sharded_encode_topk_auxk": ".ops",
}
__all__ = sorted(_EXPORTS)
__getattr__ = exports(__name__, _EXPORTS)
