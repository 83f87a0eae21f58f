"""The scheduler and block manager driven at random, as the engine drives them, with the KV cache simulated.

Each run picks a configuration (block size, token budget, sequence slots, mixed and async steps, prefix caching, a
cache that grows, LongRoPE's switch to its long table), then queues requests that share prefixes, repeat each other or carry a lockstep step hook (one
HF ``generate`` call's rows), aborts some and resets the prefix cache now and then. Every step:
- the batch is well formed (decode rows first, each sequence once, sampling exactly where its tokens end);
- every K/V slot the step writes goes through the table the runner would use (``DecodeBlockTables`` for decode
  rows), and every slot it reads holds the K/V of the same token at the same position, rotated with the same
  table (so a stale table, a block handed out twice or a cached block overwritten shows as a wrong read);
- reference counts equal the block tables holding each block, and the free count the blocks nobody holds.
At the end every request has finished and every block is free.
"""
import random

import pytest

from hf_minivllm import Config, SamplingParams
from hf_minivllm.engine.decode_tables import DecodeBlockTables
from hf_minivllm.engine.scheduler import Scheduler
from hf_minivllm.engine.sequence import Sequence
from test_scheduler import LockstepHook

EOS = 2


def next_token(seq: Sequence) -> int:
    """A token that depends only on the sequence's history (so equal prefixes continue alike), eos now and then."""
    return 3 + hash(tuple(seq.token_ids[-3:])) % 9 if hash(tuple(seq.token_ids)) % 23 else EOS


def check_blocks(scheduler: Scheduler) -> None:
    manager = scheduler.block_manager
    held = [0] * manager.num_blocks
    for seq in list(scheduler.running) + list(scheduler.waiting):
        assert len(set(seq.block_table)) == len(seq.block_table)
        for block in seq.block_table:
            held[block] += 1
    assert list(manager.ref_counts) == held
    assert manager.num_free_blocks == held.count(0)


def run(seed: int) -> None:
    rng = random.Random(seed)
    block_size, max_model_len = rng.choice([2, 4]), rng.choice([24, 40])
    config = Config(kvcache_block_size=block_size, max_model_len=max_model_len,
                    max_num_batched_tokens=rng.choice([3, 8, 64]), max_num_seqs=rng.choice([1, 2, 4, 8]),
                    mixed_steps=rng.random() < 0.6, enable_prefix_caching=rng.random() < 0.8)
    async_scheduling = rng.random() < 0.5  # a step's tokens are read back after the next one is scheduled
    decode_graphs = rng.random() < 0.5  # a mixed step's decode rows go through the decode tables (CUDA graphs)
    capacity = max_model_len // block_size + rng.randint(0, 12)
    growable = rng.random() < 0.4
    scheduler = Scheduler(config, rng.randint(max_model_len // block_size, capacity) if growable else capacity,
                          [EOS], capacity_blocks=capacity if growable else None,
                          grow=(lambda needed, wanted: min(capacity, max(needed, wanted))) if growable else None,
                          rope_long_after=rng.choice([None, None, rng.randint(8, 30)]))  # LongRoPE's switch
    tables = DecodeBlockTables(config.max_num_seqs, capacity)
    prefixes = [[rng.randrange(3, 12) for _ in range(rng.randint(1, 16))] for _ in range(3)]
    # (block, slot) -> (the sequence that wrote it, position, rotated with LongRoPE's long table)
    kv: dict[tuple[int, int], tuple[Sequence, int, bool]] = {}
    requests: list[Sequence] = []

    def add_requests() -> None:
        hook = LockstepHook() if rng.random() < 0.5 else None
        base = rng.choice(prefixes)[: rng.randint(1, 16)] + [rng.randrange(3, 12) for _ in range(rng.randint(0, 8))]
        for _ in range(rng.randint(1, 4)):
            prompt = base if rng.random() < 0.3 else base[: rng.randint(1, len(base))] + [rng.randrange(3, 12)]
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.5,
                                    step_hook=hook)
            seq = Sequence(prompt[: max_model_len - 1], params, block_size)
            scheduler.add(seq)
            requests.append(seq)

    def launch(batch) -> None:
        assert len({seq.seq_id for seq in batch.seqs}) == len(batch.seqs)
        num_decode = batch.num_decode if batch.is_prefill else len(batch.seqs)
        if batch.is_prefill and num_decode and decode_graphs:  # the runner's split mixed step
            tables.forget(batch.seqs[num_decode:])
        elif batch.is_prefill:  # one prefill pass over the whole step: its rows' own tables
            tables.clear()
            num_decode = 0
        decode_tables = tables.gather(batch.seqs[:num_decode]).tolist() if num_decode else []
        for index, (seq, count, sampled) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.sample)):
            end = seq.num_computed_tokens + count
            assert count > 0 and end <= seq.num_tokens and len(seq.block_table) * block_size >= end
            assert not sampled or end == seq.num_tokens
            table = decode_tables[index] if index < num_decode else seq.block_table
            if index < (batch.num_decode if batch.is_prefill else len(batch.seqs)):
                assert count == 1 and sampled and end == seq.num_tokens
            for position in range(seq.num_computed_tokens, end):
                kv[table[position // block_size], position % block_size] = (seq, position, seq.long_rope)
            for position in range(end):
                writer, written_at, long_rope = kv.get((table[position // block_size], position % block_size),
                                                       (None, None, None))
                known = min(position + 1, len(seq.token_ids), len(writer.token_ids)) if writer else 0
                assert written_at == position and long_rope == seq.long_rope and \
                    writer.token_ids[:known] == seq.token_ids[:known], f"wrong K/V read at position {position}"

    def complete(batch) -> None:
        tokens = [next_token(seq) if sampled else None for seq, sampled in zip(batch.seqs, batch.sample)]
        scheduler.postprocess(batch, tokens)

    for _ in range(rng.randint(1, 3)):
        add_requests()
    in_flight = None  # a step whose tokens are not read back yet (as LLMEngine.step runs them)
    for step in range(3000):
        roll = rng.random()
        if roll < 0.04 and step < 300:
            add_requests()
        elif roll < 0.06 and in_flight is None:
            unfinished = [seq for seq in requests if not seq.is_finished]
            if unfinished:
                scheduler.abort(rng.choice(unfinished))
        elif roll < 0.07:
            scheduler.block_manager.reset_prefix_cache()
        if not scheduler.has_unfinished() and in_flight is None:
            if step >= 200:
                break
            add_requests()  # idle: the next call arrives
        previous, in_flight = in_flight, None
        # As LLMEngine._may_schedule_ahead: not while a request carries a step hook.
        ahead = async_scheduling and not any(seq.sampling_params.step_hook for seq in requests if not seq.is_finished)
        batch = scheduler.schedule() if previous is None or ahead else None
        check_blocks(scheduler)
        if batch is None:
            assert previous is not None, "nothing could run although requests are waiting"
            complete(previous)
            continue
        launch(batch)
        scheduler.mark_launched(batch, tokens_pending=ahead)
        if previous is not None:
            complete(previous)
        if ahead:
            in_flight = batch
        else:
            complete(batch)
    else:
        raise AssertionError("requests still unfinished after 3000 steps")
    assert all(seq.is_finished for seq in requests)
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert not scheduler._gang_sizes and not scheduler._broken_gangs


@pytest.mark.parametrize("seed", range(200))
def test_random_workloads_keep_every_invariant(seed):
    run(seed)
