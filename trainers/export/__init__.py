"""Writing results to disk: kohya LoRA files with their metadata, single-file checkpoints, embeddings."""
