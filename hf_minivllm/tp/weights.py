"""Moving a decoder's shards from rank 0 to a worker: parameter by parameter, over the ranks' own group (NVLink
with NCCL, TCP with gloo), so no tensor is pickled and no rank ever holds another's shards.

Rank 0 describes the shards (``manifest``) and sends them in ``named_parameters`` order; the worker builds the same
decoder on the ``meta`` device from the same ``DecoderConfig`` and receives each tensor into place.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from hf_minivllm.layers.parallel import ParallelGroup
from hf_minivllm.models.decoder import DecoderConfig, DecoderForCausalLM

Manifest = list[tuple[str, tuple[int, ...], torch.dtype]]


def portable_config(decoder: DecoderForCausalLM) -> DecoderConfig:
    """The decoder's config with its tensors on the CPU, to build the same decoder in another process."""
    config = decoder.config
    long, sliding = config.rope_long_inv_freq, config.sliding_rope_inv_freq
    return dataclasses.replace(config, rope_inv_freq=config.rope_inv_freq.detach().cpu(),
                               rope_long_inv_freq=long.detach().cpu() if long is not None else None,
                               sliding_rope_inv_freq=sliding.detach().cpu() if sliding is not None else None)


def manifest(decoder: DecoderForCausalLM) -> Manifest:
    """Name, shape and dtype of every parameter, in the order ``send_weights`` sends them."""
    return [(name, tuple(param.shape), param.dtype) for name, param in decoder.named_parameters()]


@torch.no_grad()
def send_weights(group: ParallelGroup, decoder: DecoderForCausalLM, dst: int) -> None:
    """Send every parameter of ``decoder`` (rank ``dst``'s shards, wherever they are) to rank ``dst``."""
    for _, param in decoder.named_parameters():
        group.send(param.detach().to(group.device), dst)


@torch.no_grad()
def receive_decoder(group: ParallelGroup, config: DecoderConfig, expected: Manifest) -> DecoderForCausalLM:
    """Build this rank's decoder on its device from the shards rank 0 sends."""
    with torch.device("meta"):
        decoder = DecoderForCausalLM(config, group)
    own = manifest(decoder)
    if [(name, shape) for name, shape, _ in own] != [(name, shape) for name, shape, _ in expected]:
        raise RuntimeError("rank 0 sends different parameters than this rank's decoder has")
    for name, shape, dtype in expected:
        tensor = torch.empty(shape, dtype=dtype, device=group.device)
        group.recv(tensor, 0)
        module_path, _, attribute = name.rpartition(".")
        setattr(decoder.get_submodule(module_path), attribute, nn.Parameter(tensor, requires_grad=False))
    decoder.tie_weights()
    for rotary in decoder.rotary_embeddings:
        rotary.cos_sin_cache = rotary.cos_sin_cache.to(group.device)
    return decoder.eval()


@torch.no_grad()
def receive_into(group: ParallelGroup, decoder: DecoderForCausalLM) -> None:
    """Overwrite the decoder's parameters in place with new values from rank 0 (same shapes; CUDA graphs stay
    valid)."""
    for _, param in decoder.named_parameters():
        group.recv(param.data, 0)


@torch.no_grad()
def copy_weights(source: DecoderForCausalLM, target: DecoderForCausalLM) -> None:
    """Overwrite ``target``'s parameters in place with ``source``'s (rank 0's own shards after a weight change)."""
    for (_, new), (_, param) in zip(source.named_parameters(), target.named_parameters(), strict=True):
        param.data.copy_(new.detach())
