"""The data pipeline: image files and captions in, reproducible bucketed training batches out.

images.py (decoding) → captions.py → scan.py (find and check every image) → buckets.py → dataset.py
(TrainingDataset, collate) → sampler.py (BucketBatchSampler).
"""

from .dataset import BucketBatchSampler, DatasetScan, Item, TrainingDataset, collate, scan_class_images, scan_dataset

__all__ = ["BucketBatchSampler", "DatasetScan", "Item", "TrainingDataset", "collate", "scan_class_images",
           "scan_dataset"]
