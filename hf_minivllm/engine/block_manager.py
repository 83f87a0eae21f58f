"""Paged KV-cache blocks: allocation, reference counts and hash-based prefix caching.

A full block is identified by a chain hash: xxh64 over the previous block's hash and this block's token ids, so
equal hashes mean equal prefixes up to that block. A hit is confirmed by comparing token ids (hash collisions).
Freed blocks keep their content and hash and sit in an LRU free list, so a later request with the same prefix can
revive them; a block taken from the free list for new content first drops its old hash from the map.

Per-block state is flat (an array of reference counts; dicts for the blocks that hold cached content), and blocks
never handed out are a range, not objects: a small model on a large GPU gets millions of blocks, and one Python
object per block made building the engine take seconds and every later garbage collection of the caller's program
walk them all.

The pool can grow (the KV cache was given more memory) and shrink while idle. ``reset_prefix_cache`` starts a new
cache epoch: nothing computed before it is matched again, and sequences admitted before it never publish their
blocks (their KV was computed, at least in part, with the old weights).
"""
from __future__ import annotations

from array import array
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


class BlockManager:
    """Owns ``num_blocks`` KV blocks of ``block_size`` tokens each; sequences hold them through block tables (lists of
    block ids).

    Free blocks are handed out in this order: blocks released without cached content, then blocks never handed out,
    then blocks holding cached prefixes, least recently released first.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = array("i", [0]) * num_blocks
        self.contents: dict[int, tuple[int, list[int]]] = {}  # block id -> (chain hash, token ids) of cached blocks
        self.hash_to_block: dict[int, int] = {}
        self._next_unused = 0  # blocks from here on were never handed out (since they were added)
        self._free_empty: list[int] = []  # free blocks without cached content
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free blocks with cached content, LRU first
        self.epoch = 0

    def grow(self, num_blocks: int) -> None:
        """Add blocks up to ``num_blocks`` in all; new blocks are handed out before free blocks holding cached KV."""
        self.ref_counts.extend(array("i", [0]) * (num_blocks - self.num_blocks))

    def shrink(self, num_blocks: int) -> None:
        """Drop the blocks from ``num_blocks`` on; every one of them must be free. Their cached prefixes are lost."""
        if any(self.ref_counts[num_blocks:]):
            raise RuntimeError("cannot shrink the KV cache below blocks that sequences still hold")
        if self._next_unused > num_blocks:
            self._free_empty = [block_id for block_id in self._free_empty if block_id < num_blocks]
            for block_id in [block_id for block_id in self._free_cached if block_id >= num_blocks]:
                del self._free_cached[block_id]
                self._forget(block_id)
            self._next_unused = num_blocks
        del self.ref_counts[num_blocks:]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: no block computed so far is matched again (e.g. after the weights changed)."""
        self.epoch += 1
        self.hash_to_block.clear()
        self.contents.clear()
        self._free_empty.extend(self._free_cached)
        self._free_cached.clear()

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_empty) + (self.num_blocks - self._next_unused) + len(self._free_cached)

    def block_hash(self, block_id: int) -> int:
        """The chain hash of the block's cached content (NO_HASH: none)."""
        content = self.contents.get(block_id)
        return NO_HASH if content is None else content[0]

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _forget(self, block_id: int) -> None:
        """Drop the block's cached content (it is about to hold other tokens, or is gone)."""
        content = self.contents.pop(block_id, None)
        if content is not None and self.hash_to_block.get(content[0]) == block_id:
            del self.hash_to_block[content[0]]

    def _take_free_block(self) -> int:
        if self._free_empty:
            block_id = self._free_empty.pop()
        elif self._next_unused < self.num_blocks:
            block_id = self._next_unused
            self._next_unused += 1
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            self._forget(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    def _share(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self._free_cached[block_id]  # a block found by its hash holds content
        self.ref_counts[block_id] += 1

    def _release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            if block_id in self.contents:
                self._free_cached[block_id] = None
            else:
                self._free_empty.append(block_id)

    def _lookup(self, token_ids: list[int], prefix_hash: int) -> tuple[int, int | None]:
        block_hash = chain_hash(token_ids, prefix_hash)
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None or self.contents[block_id][1] != token_ids:
            return block_hash, None
        return block_hash, block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks holding ``seq``'s full blocks before its last token, as far as the prefix cache has them (no
        state change). The last token is always computed (its logits are needed), and never into a cached block:
        other sequences may read that block, and recomputed K/V differ from the cached ones in their last bits."""
        if not self.enable_prefix_caching:
            return []
        prefix_hash, found = _first_prefix(seq), []
        for index in range((len(seq) - 1) // self.block_size):
            prefix_hash, block_id = self._lookup(seq.block_tokens(index), prefix_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def blocks_short(self, seq: Sequence, reserve: int = 0) -> int:
        """How many more free blocks admitting ``seq`` needs while leaving ``reserve`` free (<= 0: it fits now).

        Cache hits on free blocks take those blocks out of the free list, so they count as used.
        """
        cached = self._cached_prefix(seq)
        revived = sum(1 for block_id in cached if self.ref_counts[block_id] == 0)
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
        for block_id in cached:
            self._share(block_id)
        seq.block_table.extend(cached)
        seq.block_table_version += 1
        seq.block_table.extend(self._take_free_block() for _ in range(seq.num_blocks - len(cached)))
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
        prefix_hash = self.block_hash(seq.block_table[index - 1]) if index else _first_prefix(seq)
        for index in range(index, full):
            block_id = seq.block_table[index]
            if block_id not in self.contents:
                token_ids = seq.block_tokens(index)
                self.contents[block_id] = (chain_hash(token_ids, prefix_hash), token_ids)
                self.hash_to_block.setdefault(self.contents[block_id][0], block_id)
            prefix_hash = self.contents[block_id][0]
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
            seq.block_table.append(self._take_free_block())
