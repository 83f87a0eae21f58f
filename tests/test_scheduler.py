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


class LockstepHook:
    """A step hook that asks for its requests to be stepped together (as HF's processors of one call do)."""

    lockstep = True

    def process_logits(self, seqs, logits):
        return logits

    def should_stop(self, seqs):
        return [False] * len(seqs)


def gang(hook, lengths, first_token=100, max_tokens=6):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, step_hook=hook)
    return [Sequence(list(range(first_token + 50 * i, first_token + 50 * i + n)), params, 4)
            for i, n in enumerate(lengths)]


def sampling_steps(scheduler: Scheduler, seqs: list[Sequence], max_steps: int = 200) -> list[set[int]]:
    """Run to completion; per step, which of ``seqs`` took a token."""
    steps = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return steps
        batch = scheduler.schedule()
        assert batch is not None, "nothing could run although requests are waiting"
        scheduler.mark_launched(batch, tokens_pending=False)
        scheduler.postprocess(batch, [5 if sampled else None for sampled in batch.sample])
        steps.append({index for index, seq in enumerate(seqs)
                      for row, sampled in zip(batch.seqs, batch.sample) if sampled and row is seq})
    raise AssertionError("requests still unfinished")


def test_a_lockstep_gang_prefilled_over_several_steps_takes_every_token_together():
    for mixed_steps in (True, False):
        scheduler = Scheduler(Config(kvcache_block_size=4, max_num_batched_tokens=8, mixed_steps=mixed_steps), 64,
                              eos_token_ids=[2])
        loner = Sequence(list(range(10, 14)), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), 4)
        seqs = gang(LockstepHook(), [12, 7, 10, 3])
        for seq in [loner] + seqs:
            scheduler.add(seq)
        steps = [taken for taken in sampling_steps(scheduler, seqs) if taken]
        assert steps == [{0, 1, 2, 3}] * 6, "the gang's rows take each token in the same step"
        assert len(loner.completion_token_ids) == 9  # the request outside the gang was not held back
        assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_a_gang_that_cannot_all_be_admitted_goes_on_separately_rather_than_wait_forever():
    """Two sequence slots for three rows, or a cache too small for all of them at once: stepping them together
    would wait forever for a member that cannot get in, so they go on separately (and all finish)."""
    for config, num_blocks in ((Config(kvcache_block_size=4, max_num_seqs=2), 64),
                               (Config(kvcache_block_size=4, max_num_batched_tokens=8), 9)):
        scheduler = Scheduler(config, num_blocks, eos_token_ids=[2])
        seqs = gang(LockstepHook(), [8, 8, 8])
        for seq in seqs:
            scheduler.add(seq)
        sampling_steps(scheduler, seqs)
        assert all(len(seq.completion_token_ids) == 6 for seq in seqs)
        assert scheduler._gang_sizes == {} and scheduler._broken_gangs == set()


def test_two_gangs_competing_for_the_cache_both_finish():
    scheduler = Scheduler(Config(kvcache_block_size=4), 12, eos_token_ids=[2])
    first, second = gang(LockstepHook(), [8, 8]), gang(LockstepHook(), [8, 8], first_token=300)
    for seq in first + second:
        scheduler.add(seq)
    sampling_steps(scheduler, first + second)
    assert all(len(seq.completion_token_ids) == 6 for seq in first + second)


def test_a_gang_that_fits_whole_samples_in_its_prefill_step():
    """The common case costs no extra step: every member prefilled in one step takes its first token there."""
    scheduler = Scheduler(Config(kvcache_block_size=4), 64, eos_token_ids=[2])
    seqs = gang(LockstepHook(), [12, 7, 10, 3])
    for seq in seqs:
        scheduler.add(seq)
    assert sampling_steps(scheduler, seqs) == [{0, 1, 2, 3}] * 6


def test_every_free_sequence_slot_is_filled_in_one_step():
    """A prompt prefilled whole joins the running sequences at once: it must not count twice against max_num_seqs
    (four slots took two prompts a step), which also left a gang admitted whole short of a member."""
    scheduler = Scheduler(Config(kvcache_block_size=4, max_num_seqs=4), 64, eos_token_ids=[2])
    seqs = gang(LockstepHook(), [5] * 4, max_tokens=3)
    for seq in seqs:
        scheduler.add(seq)
    first = scheduler.schedule()
    assert first.seqs == seqs and all(first.sample)


def test_a_gang_whose_last_member_joined_in_this_step_is_not_broken_by_a_later_prompt_that_waits():
    scheduler = Scheduler(Config(kvcache_block_size=4, max_num_batched_tokens=8), 6, eos_token_ids=[2])
    seqs = gang(LockstepHook(), [8, 8], max_tokens=2)
    waiting = Sequence(list(range(300, 312)), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), 4)
    for seq in seqs + [waiting]:
        scheduler.add(seq)
    for _ in range(2):  # the first member's prompt, then the second's (it joins; the waiting prompt finds no block)
        batch = scheduler.schedule()
        scheduler.mark_launched(batch, tokens_pending=False)
        scheduler.postprocess(batch, [5 if sampled else None for sampled in batch.sample])
    assert not scheduler._broken_gangs
    assert [taken for taken in sampling_steps(scheduler, seqs) if taken] == [{0, 1}] * 2
    assert len(waiting.completion_token_ids) == 1
