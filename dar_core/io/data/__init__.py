"""Training data: a procedural class-conditional dataset, an in-memory loader for small user
shards, and a streaming loader for the shards ``dar prepare`` writes."""

from dar_core.io.data.folder import FolderDataset, make_dataset
from dar_core.io.data.procedural import ProceduralDataset
from dar_core.io.data.shards import ShardDataset

__all__ = ["FolderDataset", "ProceduralDataset", "ShardDataset", "make_dataset"]
