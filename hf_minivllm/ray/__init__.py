"""Data-parallel generation on Ray: one engine replica per GPU (or TP group), a Ray Dataset's rows streamed through
them in batches. ``generate`` runs a whole dataset; ``GenerationReplica`` is the callable class behind it, for
pipelines built with ``Dataset.map_batches``.

This subpackage is the only part of hf-minivllm that imports ``ray`` (``pip install "hf-minivllm[ray]"``).
"""
from hf_minivllm.ray.data import generate, replica_pool
from hf_minivllm.ray.replica import GenerationReplica

__all__ = ["GenerationReplica", "generate", "replica_pool"]
