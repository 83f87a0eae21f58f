"""Scheduler corner cases driven without a model: the scheduler's own steps, tokens made up."""
from hf_minivllm import Config, SamplingParams
from hf_minivllm.engine.scheduler import Scheduler
from hf_minivllm.engine.sequence import Sequence


def run_to_completion(scheduler: Scheduler, max_steps: int = 200) -> None:
    """One step at a time, every sampled token 5; fails if a step finds nothing to run while requests wait."""
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return
        batch = scheduler.schedule()
        assert batch is not None, "nothing could run although requests are waiting"
        scheduler.mark_launched(batch, tokens_pending=False)
        scheduler.postprocess(batch, [5 if sampled else None for sampled in batch.sample])
    raise AssertionError("requests still unfinished")


def test_a_long_rope_recompute_does_not_leave_a_chunked_prompt_holding_its_blocks_behind_it():
    """LongRoPE: a running request crossing the original context is recomputed first, in front of the queue. A
    prompt being prefilled in chunks holds its blocks at the queue's head meanwhile; it must give them back (as
    when a running request needs a block), or the recompute, needing them, waits forever behind it."""
    config = Config(kvcache_block_size=4, max_model_len=32, max_num_batched_tokens=4)
    scheduler = Scheduler(config, 8, eos_token_ids=[2], rope_long_after=12)
    running = Sequence(list(range(10, 18)), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), 4)
    prompt = Sequence(list(range(20, 40)), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), 4)
    scheduler.add(running)
    for _ in range(2):
        batch = scheduler.schedule()
        scheduler.mark_launched(batch, tokens_pending=False)
        scheduler.postprocess(batch, [5 if sampled else None for sampled in batch.sample])
    scheduler.add(prompt)
    run_to_completion(scheduler)
    assert running.long_rope and len(running.completion_token_ids) == 16
    assert len(prompt.completion_token_ids) == 1
    manager = scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks
