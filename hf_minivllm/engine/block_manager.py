"""Paged KV-cache blocks: allocation, reference counts and hash-based prefix caching.

A full block is identified by a chain hash: xxh64 over the previous block's hash and this block's token ids, so
equal hashes mean equal prefixes up to that block. A hit is confirmed by comparing token ids (hash collisions).
Freed blocks keep their content and hash and sit in an LRU free list, so a later request with the same prefix can
revive them; a block taken from the free list for new content first drops its old hash from the map.

The pool can grow (the KV cache was given more memory) and shrink while idle. ``reset_prefix_cache`` starts a new
cache epoch: nothing computed before it is matched again, and sequences admitted before it never publish their
blocks (their KV was computed, at least in part, with the old weights).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from hf_minivllm.engine.sequence import Sequence

NO_HASH = -1
LONG_ROPE_SALT = 1


def _first_prefix(seq: Sequence) -> int:
    """What the first block's hash chains on. The K/V of a LongRoPE sequence rotated with the long table differ from
    the same tokens' rotated with the short one, so those blocks live in their own prefix-cache namespace."""
    return LONG_ROPE_SALT if seq.long_rope else NO_HASH


def chain_hash(token_ids: list[int], prefix_hash: int) -> int:
    """Hash of a full block given the hash of the block before it (NO_HASH for the first block)."""
    h = xxhash.xxh64()
    if prefix_hash != NO_HASH:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = NO_HASH
        self.token_ids: list[int] = []


class BlockManager:
    """Owns ``num_blocks`` KV blocks of ``block_size`` tokens each; sequences hold them through block tables."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.epoch = 0

    def grow(self, num_blocks: int) -> None:
        """Add blocks up to ``num_blocks`` in all; new blocks are handed out before free blocks holding cached KV."""
        old = len(self.blocks)
        self.blocks.extend(Block(i) for i in range(old, num_blocks))
        for block_id in range(num_blocks - 1, old - 1, -1):
            self.free_blocks[block_id] = None
            self.free_blocks.move_to_end(block_id, last=False)

    def shrink(self, num_blocks: int) -> None:
        """Drop the blocks from ``num_blocks`` on; every one of them must be free. Their cached prefixes are lost."""
        dropped = self.blocks[num_blocks:]
        if any(block.ref_count for block in dropped):
            raise RuntimeError("cannot shrink the KV cache below blocks that sequences still hold")
        for block in dropped:
            del self.free_blocks[block.block_id]
            if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block.block_id:
                del self.hash_to_block[block.hash]
        del self.blocks[num_blocks:]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: no block computed so far is matched again (e.g. after the weights changed)."""
        self.epoch += 1
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash = NO_HASH
            block.token_ids = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take_free_block(self) -> Block:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != NO_HASH and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash = NO_HASH
        block.token_ids = []
        block.ref_count = 1
        return block

    def _share(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free_blocks[block.block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None

    def _lookup(self, token_ids: list[int], prefix_hash: int) -> tuple[int, Block | None]:
        block_hash = chain_hash(token_ids, prefix_hash)
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return block_hash, None
        return block_hash, self.blocks[block_id]

    def _cached_prefix(self, seq: Sequence) -> list[Block]:
        """The blocks holding ``seq``'s full blocks before its last token, as far as the prefix cache has them (no
        state change). The last token is always computed (its logits are needed), and never into a cached block:
        other sequences may read that block, and recomputed K/V differ from the cached ones in their last bits."""
        if not self.enable_prefix_caching:
            return []
        prefix_hash, found = _first_prefix(seq), []
        for index in range((len(seq) - 1) // self.block_size):
            prefix_hash, block = self._lookup(seq.block_tokens(index), prefix_hash)
            if block is None:
                break
            found.append(block)
        return found

    def blocks_short(self, seq: Sequence, reserve: int = 0) -> int:
        """How many more free blocks admitting ``seq`` needs while leaving ``reserve`` free (<= 0: it fits now).

        Cache hits on free blocks take those blocks out of the free list, so they count as used.
        """
        cached = self._cached_prefix(seq)
        revived = sum(1 for block in cached if block.ref_count == 0)
        return reserve + revived + (seq.num_blocks - len(cached)) - self.num_free_blocks

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Whether ``seq``'s blocks fit while leaving ``reserve`` blocks free (cache hits on free blocks count)."""
        return self.blocks_short(seq, reserve) <= 0

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached full blocks of its prefix.

        Sets ``seq.num_computed_tokens`` to the cached prefix length, which leaves at least the last token to compute
        (a fully cached prompt still needs logits: its last block is computed again, in a block of its own). Hashes
        of the new full blocks are published later, by ``publish``, once the step that computes them is scheduled.
        """
        assert not seq.block_table, "sequence already holds blocks"
        cached = self._cached_prefix(seq)
        for block in cached:
            self._share(block)
            seq.block_table.append(block.block_id)
        for _ in range(seq.num_blocks - len(cached)):
            seq.block_table.append(self._take_free_block().block_id)
        seq.num_hashed_blocks = len(cached)
        seq.cache_epoch = self.epoch
        seq.num_cached_tokens = len(cached) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens

    def publish(self, seq: Sequence, num_tokens: int) -> None:
        """Register the hashes of ``seq``'s full blocks within its first ``num_tokens`` tokens.

        Called when a step that computes those tokens is scheduled: a sequence admitted later in the same step may
        then share the blocks (the forward writes every new token's K/V before any attention reads the cache).
        """
        if not self.enable_prefix_caching or seq.cache_epoch != self.epoch:
            return
        full = num_tokens // self.block_size
        index = seq.num_hashed_blocks
        if index >= full:
            return
        prefix_hash = self.blocks[seq.block_table[index - 1]].hash if index else _first_prefix(seq)
        for index in range(index, full):
            block = self.blocks[seq.block_table[index]]
            if block.hash == NO_HASH:
                block.token_ids = seq.block_tokens(index)
                block.hash = chain_hash(block.token_ids, prefix_hash)
                self.hash_to_block.setdefault(block.hash, block.block_id)
            prefix_hash = block.hash
        seq.num_hashed_blocks = full

    def deallocate(self, seq: Sequence) -> None:
        """Return ``seq``'s blocks (last first, so a prefix's tail is evicted before its head)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step of ``seq`` (one new token) has room, allocating at most one block."""
        return seq.num_tokens <= len(seq.block_table) * self.block_size or self.num_free_blocks >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the token at position ``seq.num_tokens - 1`` before a decode step."""
        if seq.num_tokens > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free_block().block_id)
