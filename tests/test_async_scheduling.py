"""Async scheduling (the next decode step queued before the last one's tokens are read back) against one step at a
time: the same tokens, finish reasons and statistics, every block freed, in the cases where a pending token matters
(eos and stop tokens that end a request mid-flight, length limits, preemption, requests arriving mid-run)."""
import pytest
import torch

from hf_minivllm import LLM, Config, SamplingParams
from conftest import tiny_model


def engine_pair(family="qwen3", **engine):
    """Two LLMs over copies of one model, the first scheduling ahead, the second one step at a time."""
    settings = dict(num_kvcache_blocks=256, kvcache_block_size=4) | engine
    model = tiny_model(family)
    ahead = LLM(model, async_scheduling=True, **settings)
    one_by_one = LLM(tiny_model(family), async_scheduling=False, **settings)
    return ahead, one_by_one


def count_launches(llm: LLM) -> dict[str, int]:
    """Wrap the runner so the test sees how many steps were queued while another was in flight, and how many
    decode rows were computed."""
    runner = llm.engine.runner
    launch = runner.launch
    counts = {"ahead": 0, "decode_rows": 0}

    def counting_launch(batch, previous=None):
        counts["ahead"] += previous is not None
        counts["decode_rows"] += 0 if batch.is_prefill else len(batch.seqs)
        return launch(batch, previous)

    runner.launch = counting_launch
    return counts


def finished_sequences(llm: LLM, prompts, params):
    seqs = llm.engine.generate(prompts, params)
    return [(seq.completion_token_ids, seq.finish_reason) for seq in seqs]


def assert_engine_drained(llm: LLM) -> None:
    engine = llm.engine
    manager = engine.scheduler.block_manager
    assert engine.in_flight is None and not engine.has_unfinished()
    assert manager.num_free_blocks == manager.num_blocks
    assert not any(manager.ref_counts)


def random_prompts(lengths, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=generator).tolist() for n in lengths]


def test_stop_tokens_that_end_requests_mid_flight_give_the_same_outputs():
    ahead, one_by_one = engine_pair()
    prompts = random_prompts((9, 14, 6, 11, 8, 12, 5))
    free_run = one_by_one.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    # Each request stops on a token it produces somewhere in its middle: the finish is unknown when the next step
    # is scheduled, so that step computes a token that must be dropped.
    params = [
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[out["token_ids"][3 + row % 7]])
        for row, out in enumerate(free_run)
    ]
    launches = count_launches(ahead)
    expected = finished_sequences(one_by_one, prompts, params)
    got = finished_sequences(ahead, prompts, params)
    assert got == expected
    assert any(len(tokens) < 24 for tokens, _ in got), "some request must stop on its stop token"
    assert launches["ahead"] > 0
    assert ahead.stats.generated_tokens == sum(len(tokens) for tokens, _ in got), "dropped tokens are not counted"
    assert_engine_drained(ahead)


def test_length_limits_end_requests_without_an_extra_step():
    ahead, one_by_one = engine_pair(max_model_len=32)
    prompts = random_prompts((27, 20, 6, 30))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 3, 1, 9)]
    launches = count_launches(ahead)
    expected = finished_sequences(one_by_one, prompts, params)
    assert finished_sequences(ahead, prompts, params) == expected
    assert [len(tokens) for tokens, _ in expected] == [5, 3, 1, 2]
    # Prefill gives each request its first token; every later one costs exactly one decode row (none wasted).
    assert launches["ahead"] > 0 and launches["decode_rows"] == sum(len(tokens) - 1 for tokens, _ in expected)
    assert_engine_drained(ahead)


def test_preemption_with_pending_tokens_gives_the_same_outputs():
    ahead, one_by_one = engine_pair(num_kvcache_blocks=14)
    prompts = random_prompts((9, 14, 6, 11, 8, 12), seed=8)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    launches = count_launches(ahead)
    expected = finished_sequences(one_by_one, prompts, [params] * len(prompts))
    assert finished_sequences(ahead, prompts, [params] * len(prompts)) == expected
    assert ahead.stats.preemptions > 0 and launches["ahead"] > 0
    assert_engine_drained(ahead)


def test_seeded_sampling_min_tokens_and_prefix_cache_match():
    ahead, one_by_one = engine_pair("llama")
    shared = random_prompts((16,), seed=5)[0]
    prompts = [shared + tail for tail in random_prompts((3, 7, 1, 5), seed=6)]
    first = one_by_one.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    params = [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=11, max_tokens=16),
        SamplingParams(temperature=1.0, min_p=0.05, seed=12, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, min_tokens=4, stop_token_ids=first["token_ids"]),
        SamplingParams(temperature=0.7, seed=13, max_tokens=16, ignore_eos=True),
    ]
    expected = finished_sequences(one_by_one, prompts, params)
    assert finished_sequences(ahead, prompts, params) == expected
    assert ahead.stats.prefix_cache_hit_tokens == 3 * len(shared), "later prompts reuse the first one's blocks"
    assert_engine_drained(ahead)


def test_requests_added_while_a_step_is_in_flight():
    ahead, one_by_one = engine_pair("qwen2")
    prompts = random_prompts((10, 4, 13, 7))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [tokens for tokens, _ in finished_sequences(one_by_one, prompts, [params] * 4)]
    engine = ahead.engine
    seqs = [engine.add_request(prompts[0], params), engine.add_request(prompts[1], params)]
    while engine.in_flight is None:
        engine.step()
    seqs += [engine.add_request(prompt, params) for prompt in prompts[2:]]
    while engine.has_unfinished():
        engine.step()
    assert [seq.completion_token_ids for seq in seqs] == expected
    assert_engine_drained(ahead)


def test_stream_sees_only_known_tokens():
    ahead, one_by_one = engine_pair()
    prompts = random_prompts((6, 9))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    streamed = [[], []]
    for event in ahead.stream(prompts, params):
        streamed[event.index] += event.token_ids
    assert streamed == [out["token_ids"] for out in one_by_one.generate(prompts, params, use_tqdm=False)]


def test_async_scheduling_must_be_a_boolean():
    with pytest.raises(ValueError, match="async_scheduling"):
        Config(async_scheduling="yes")


def test_a_sequence_preempted_while_its_token_is_pending_can_finish_from_the_queue():
    from hf_minivllm.engine.scheduler import Scheduler
    from hf_minivllm.engine.sequence import FinishReason, Sequence

    scheduler = Scheduler(Config(max_model_len=64, kvcache_block_size=4), num_blocks=4, eos_token_ids=[0])
    first = Sequence([3] * 7, SamplingParams(max_tokens=10, ignore_eos=True), 4)  # 2 blocks
    second = Sequence([4] * 4, SamplingParams(max_tokens=10, stop_token_ids=[7]), 4)  # 1 block
    scheduler.add(first)
    scheduler.add(second)
    prefill = scheduler.schedule()
    scheduler.mark_launched(prefill, tokens_pending=False)
    scheduler.postprocess(prefill, [5, 6])
    decode = scheduler.schedule()  # both grow into a new block: the cache is full
    scheduler.mark_launched(decode, tokens_pending=True)
    ahead = scheduler.schedule()  # the next step, before decode's tokens are known: `second` is preempted
    assert ahead.seqs == [first] and second in scheduler.waiting and second.num_pending_tokens == 1
    scheduler.mark_launched(ahead, tokens_pending=True)
    updated, finished = scheduler.postprocess(decode, [5, 7])  # decode's token for `second` is its stop token
    assert finished == [second] and second.finish_reason == FinishReason.STOP
    assert not scheduler.waiting and list(scheduler.running) == [first]
    assert second.num_pending_tokens == 0 and second.completion_token_ids == [6, 7]
    assert scheduler.block_manager.num_free_blocks == 4 - len(first.block_table)


def test_more_requests_than_sequences_admitted_stay_async_and_match():
    ahead, one_by_one = engine_pair("llama", max_num_seqs=3, max_num_batched_tokens=24)
    prompts = random_prompts((9, 14, 6, 11, 8, 12, 5, 16))
    free_run = one_by_one.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[out["token_ids"][2 + row % 5]])
              for row, out in enumerate(free_run)]
    launches = count_launches(ahead)
    prefills_ahead = [0]
    launch = ahead.engine.runner.launch

    def note_prefills(batch, previous=None):
        prefills_ahead[0] += batch.is_prefill and previous is not None
        return launch(batch, previous)

    ahead.engine.runner.launch = note_prefills
    expected = finished_sequences(one_by_one, prompts, params)
    assert finished_sequences(ahead, prompts, params) == expected
    assert prefills_ahead[0] > 0, "requests admitted later are prefilled while a decode step is in flight"
    assert launches["ahead"] > 0
    assert_engine_drained(ahead)


def test_a_request_preempted_with_its_token_pending_is_not_recomputed_in_the_same_mixed_step():
    """A mixed step decodes first, and a preemption there can free enough blocks (identical prompts share theirs)
    for the queue's head at once: that head is the request just preempted, whose last token is still on the device.
    Prefilling it in the same step would sample that position a second time; it must wait one step."""
    from hf_minivllm.engine.scheduler import Scheduler
    from hf_minivllm.engine.sequence import Sequence

    config = Config(num_kvcache_blocks=4, kvcache_block_size=4, max_model_len=64, max_num_batched_tokens=64)
    scheduler = Scheduler(config, 4, eos_token_ids=[2])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seqs = [Sequence([7], params, 4), Sequence([7], params, 4)]
    for seq in seqs:
        scheduler.add(seq)
    previous, prefilled_while_pending = None, []
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        if batch is not None:
            prefill_rows = range(batch.num_decode, len(batch.seqs)) if batch.is_prefill else ()
            prefilled_while_pending += [batch.seqs[row].seq_id for row in prefill_rows
                                        if batch.seqs[row].num_pending_tokens and batch.sample[row]]
            scheduler.mark_launched(batch, tokens_pending=True)
        if previous is not None:  # the engine reads the step in flight back after queueing the next
            scheduler.postprocess(previous, [5] * len(previous.seqs))
        previous = batch
    assert scheduler.num_preemptions > 0
    assert prefilled_while_pending == []
    assert [len(seq.completion_token_ids) for seq in seqs] == [12, 12]
