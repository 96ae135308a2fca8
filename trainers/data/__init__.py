"""The data pipeline: image files and captions in, reproducible bucketed training batches out."""
