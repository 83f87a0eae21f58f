"""Paged blocks, reference counts and the prefix cache, including the pitfalls listed in DESIGN.md section 4."""
import pytest

from hf_minivllm.engine import block_manager as bm
from hf_minivllm.engine.block_manager import BlockManager
from hf_minivllm.engine.sequence import Sequence
from hf_minivllm.sampling_params import SamplingParams

BS = 4


def seq(tokens):
    return Sequence(list(tokens), SamplingParams(max_tokens=8), BS)


def admit(manager, s):
    manager.allocate(s)
    manager.publish(s, len(s))
    return s


def test_allocate_and_free_restores_every_block():
    manager = BlockManager(8, BS)
    a = admit(manager, seq(range(10)))
    assert len(a.block_table) == 3 and manager.num_free_blocks == 5
    manager.deallocate(a)
    assert manager.num_free_blocks == 8 and a.block_table == []


def test_shared_prefix_hits_full_blocks_only():
    manager = BlockManager(16, BS)
    a = admit(manager, seq(list(range(10))))
    b = admit(manager, seq(list(range(8)) + [50, 51, 52]))
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert manager.ref_counts[a.block_table[0]] == 2


def test_fully_cached_prompt_recomputes_its_last_block_in_a_block_of_its_own():
    """Its last token still needs logits, so its K/V are written again. Written into the cached block, they would
    change K/V that other sequences share (recomputed values differ in their last bits, and two such prompts
    admitted in one step write the same slot at once): the cache serves the blocks before the last token only."""
    manager = BlockManager(16, BS)
    a = admit(manager, seq(range(8)))
    for b in (seq(range(8)), seq(range(8))):
        manager.allocate(b)
        assert b.num_cached_tokens == 4 and b.num_computed_tokens == 4
        assert b.block_table[0] == a.block_table[0]
        written = b.block_table[b.num_computed_tokens // BS]
        assert manager.ref_counts[written] == 1 and manager.block_hash(written) == bm.NO_HASH, \
            "computed into a block the cache may share"
        manager.publish(b, len(b))
    manager.deallocate(a)
    c = seq(range(8))  # a preempted sequence's own blocks, revived: the last one is recomputed all the same
    manager.allocate(c)
    assert c.num_cached_tokens == 4 and manager.block_hash(c.block_table[1]) == bm.NO_HASH


def test_same_new_prefix_admitted_in_one_step_shares_blocks():
    manager = BlockManager(16, BS)
    a, b = seq(range(13)), seq(range(13))
    admit(manager, a)
    admit(manager, b)  # no step ran in between: the hashes were published at scheduling time
    assert a.block_table[:3] == b.block_table[:3] and a.block_table[3] != b.block_table[3]
    assert manager.num_free_blocks == 16 - 5


def test_freed_blocks_are_revived_until_overwritten():
    manager = BlockManager(3, BS)
    a = admit(manager, seq(range(8)))
    manager.deallocate(a)
    b = admit(manager, seq(range(9)))
    assert b.num_cached_tokens == 8  # revived from the free list
    manager.deallocate(b)
    c = admit(manager, seq([90 + i for i in range(12)]))  # needs all 3 blocks: old content overwritten
    assert sorted(c.block_table) == [0, 1, 2]
    manager.deallocate(c)
    d = seq(range(8))
    manager.allocate(d)
    assert d.num_cached_tokens == 0, "overwritten blocks no longer hold the old prefix"


def test_hash_collision_is_caught_by_comparing_token_ids(monkeypatch):
    monkeypatch.setattr(bm, "chain_hash", lambda tokens, prefix: 42)
    manager = BlockManager(16, BS)
    admit(manager, seq([1, 2, 3, 4, 5]))
    b = seq([9, 9, 9, 9, 5])
    manager.allocate(b)
    assert b.num_cached_tokens == 0


def test_can_allocate_counts_revived_blocks_and_reserve():
    manager = BlockManager(4, BS)
    a = admit(manager, seq(range(8)))
    manager.deallocate(a)
    assert manager.can_allocate(seq(range(16)))  # 2 revived + 2 fresh = all 4 blocks
    assert not manager.can_allocate(seq(range(17)))
    assert not manager.can_allocate(seq(range(16)), reserve=1)


def test_prefix_caching_off_shares_nothing():
    manager = BlockManager(16, BS, enable_prefix_caching=False)
    a = admit(manager, seq(range(8)))
    b = admit(manager, seq(range(8)))
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)


def test_decode_appends_a_block_at_the_boundary_and_publishes_full_blocks():
    manager = BlockManager(8, BS)
    a = admit(manager, seq(range(4)))
    a.num_computed_tokens = 4
    a.append_token(100)  # position 4 starts block 2
    assert manager.can_append(a)
    manager.append_slot(a)
    assert len(a.block_table) == 2
    for token in (101, 102, 103):
        a.append_token(token)
        manager.append_slot(a)
    manager.publish(a, len(a))
    b = admit(manager, seq([0, 1, 2, 3, 100, 101, 102, 103, 7]))
    assert b.num_cached_tokens == 8


def test_zero_blocks_is_an_error():
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, BS)


def test_reused_block_with_equal_tokens_after_another_prefix_is_not_a_hit():
    """Token comparison alone cannot catch this: the reused block holds the same tokens, but after another prefix
    (so different KV); only dropping its old hash on reuse keeps the old chain from finding it."""
    manager = BlockManager(3, BS)
    first_prefix, other_prefix, tail = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    a = admit(manager, seq(first_prefix + tail))
    manager.deallocate(a)  # frees the tail block first, then the prefix block: the never-used block is first in line
    c = admit(manager, seq(other_prefix + tail))  # takes the fresh block and a's tail block
    manager.deallocate(c)
    d = seq(first_prefix + tail + [13])
    manager.allocate(d)
    assert d.num_cached_tokens == 4, "only the first prefix block is still cached"


def test_decode_block_tables_follow_appends_departures_and_clear():
    from hf_minivllm.engine.decode_tables import DecodeBlockTables

    tables = DecodeBlockTables(max_num_seqs=3, max_blocks_per_seq=8)
    params = SamplingParams(max_tokens=4)
    seqs = [Sequence([1] * 5, params, 4) for _ in range(3)]
    for index, seq in enumerate(seqs):
        seq.block_table = [10 * index, 10 * index + 1]

    def expected(batch):
        width = max(len(seq.block_table) for seq in batch)
        return [seq.block_table + [None] * (width - len(seq.block_table)) for seq in batch]

    def check(batch):
        table = tables.gather(batch)
        for row, want in zip(table.tolist(), expected(batch)):
            assert [got for got, w in zip(row, want) if w is not None] == [w for w in want if w is not None]

    check(seqs)
    seqs[1].block_table.append(12)  # a decode step filled a block
    check(seqs[::-1])
    newcomer = Sequence([2] * 3, params, 4)
    newcomer.block_table = [7]
    check([seqs[0], newcomer, seqs[2]])  # seqs[1] left: its row is reused
    tables.clear()  # a prefill step: tables may have been rebuilt
    seqs[0].block_table[:] = [30, 31, 32]
    check([seqs[0], newcomer])


def test_grown_blocks_are_handed_out_before_free_blocks_that_hold_cached_prefixes():
    manager = BlockManager(4, BS)
    a = admit(manager, seq(range(8)))
    cached = list(a.block_table)
    manager.deallocate(a)
    manager.grow(8)
    assert manager.num_blocks == 8 and manager.num_free_blocks == 8
    b = admit(manager, seq(range(100, 116)))
    assert not set(b.block_table) & set(cached), "new blocks first: the cached prefix survives"
    assert admit(manager, seq(range(9))).num_cached_tokens == 8


def test_shrink_drops_only_free_blocks_and_their_cached_prefixes():
    manager = BlockManager(8, BS)
    manager.grow(12)
    a = admit(manager, seq(range(40)))  # ten blocks: 8 and 9 among them
    with pytest.raises(RuntimeError, match="still hold"):
        manager.shrink(8)
    manager.deallocate(a)
    manager.shrink(8)
    assert manager.num_blocks == 8 and manager.num_free_blocks == 8
    assert all(block_id < 8 for block_id in manager.hash_to_block.values())
    assert set(manager.contents) == set(range(8))
    assert admit(manager, seq(range(20))).num_cached_tokens == 16, "the prefix in the blocks kept still hits"


def test_reset_prefix_cache_forgets_hits_and_old_sequences_never_publish():
    manager = BlockManager(16, BS)
    old = admit(manager, seq(range(8)))
    manager.reset_prefix_cache()
    fresh = admit(manager, seq(range(8)))
    assert fresh.num_cached_tokens == 0, "blocks computed before the reset are not matched"
    old.token_ids += list(range(8, 12))
    old.block_table.append(manager._take_free_block())
    manager.publish(old, 12)  # the old sequence's new block: computed on top of stale KV
    probe = seq(list(range(12)) + [99])
    assert manager._cached_prefix(probe) == fresh.block_table[:2]


def test_millions_of_blocks_cost_no_python_object_each():
    """A small model on a large GPU gets millions of blocks (a test model given 40 GB: ten million). One object per
    block made the engine take seconds to build and every later garbage collection of the program walk them all."""
    import gc

    gc.collect()
    before = len(gc.get_objects())
    manager = BlockManager(10_000_000, BS)
    manager.grow(12_000_000)
    a = admit(manager, seq(range(40)))
    assert len(gc.get_objects()) - before < 50
    manager.deallocate(a)
    manager.shrink(1_000)
    assert manager.num_blocks == manager.num_free_blocks == 1_000
    assert admit(manager, seq(range(40))).num_cached_tokens == 36


def test_decode_block_tables_rebuild_a_row_whose_sequence_got_a_new_table():
    """A lockstep gang's member whose prompt, all but its last token, is cached gets a new table and joins the running
    sequences without a prefill row, so no clear or forget comes: the row must follow the table's version."""
    from hf_minivllm.engine.decode_tables import DecodeBlockTables

    manager, tables = BlockManager(16, BS), DecodeBlockTables(max_num_seqs=2, max_blocks_per_seq=8)
    recomputed = admit(manager, seq(range(9)))
    tables.gather([recomputed])
    manager.deallocate(recomputed)  # preempted
    admit(manager, seq(range(50, 62)))  # takes its last block
    manager.allocate(recomputed)  # its two cached blocks back, and another last block
    assert tables.gather([recomputed]).tolist() == [recomputed.block_table]
