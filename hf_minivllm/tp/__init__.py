"""Tensor parallelism: one model sharded over N devices, rank 0 in the caller's process, the others in worker
processes the engine starts and owns (``workers``), fed each step's plan (``worker``) and their shards (``weights``)."""
from hf_minivllm.tp.workers import TensorParallelError, TensorParallelWorkers, tensor_parallel_devices

__all__ = ["TensorParallelError", "TensorParallelWorkers", "tensor_parallel_devices"]
