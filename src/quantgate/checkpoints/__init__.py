"""Loading checkpoints, one loader per format, each audited: what loads must load whole."""

from .loading import LoadedCheckpoint, checkpoint_size_bytes, load_checkpoint, load_tokenizer

__all__ = ["LoadedCheckpoint", "checkpoint_size_bytes", "load_checkpoint", "load_tokenizer"]
