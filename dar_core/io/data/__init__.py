"""Training data: a procedural class-conditional dataset and a loader for user shards."""

from dar_core.io.data.folder import FolderDataset, make_dataset
from dar_core.io.data.procedural import ProceduralDataset

__all__ = ["FolderDataset", "ProceduralDataset", "make_dataset"]
