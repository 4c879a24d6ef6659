"""Training data: a procedural class-conditional dataset and a loader for user shards."""

from dar_core.data.folder import FolderDataset, make_dataset
from dar_core.data.procedural import ProceduralDataset

__all__ = ["FolderDataset", "ProceduralDataset", "make_dataset"]
