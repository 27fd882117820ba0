"""Worker for test_metrics: each of two ranks adds its half of the features, then all_reduce; each rank saves."""

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from unnoise.metrics import FeatureStatistics

if __name__ == "__main__":
    feats_path, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")  # rank, world size and address from torchrun's environment variables
    rank, world = dist.get_rank(), dist.get_world_size()
    feats = np.load(feats_path)
    stats = FeatureStatistics(feats.shape[1])
    for batch in np.array_split(np.array_split(feats, world)[rank], 2):
        stats.update(batch)
    stats.all_reduce().save(out / f"rank{rank}.npz")
    dist.destroy_process_group()
