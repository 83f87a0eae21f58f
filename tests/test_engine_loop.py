"""The engine loop's failure paths: whatever one caller's callback or a failed close does, every other caller is
woken with its own answer or a named error, never left waiting."""
import threading

import pytest

from conftest import SMALL_ENGINE, tiny_model
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine.llm_engine import EngineClosed
from hf_minivllm.engine.sequence import FinishReason

LONG = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)


@pytest.fixture
def llm():
    with LLM(tiny_model("qwen3"), **SMALL_ENGINE) as llm:
        yield llm


def in_thread(function) -> tuple[threading.Thread, dict]:
    """Run ``function`` in a daemon thread; its result or exception lands in the returned dict."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_a_close_that_fails_to_release_still_wakes_the_callers_it_aborted():
    """Closing aborts every request; if releasing the engine's memory then fails, the aborted callers must still
    hear ``EngineClosed`` (not wait forever) and the closer gets the failure."""
    llm = LLM(tiny_model("qwen3"), **SMALL_ENGINE)

    def failing_close():
        raise RuntimeError("releasing the KV cache failed")

    llm.engine.runner.close = failing_close
    seqs = llm.sequences([[4, 5, 6]], [LONG])
    group = llm.loop.submit(seqs)  # queued before the close: admitted, then aborted by it
    with pytest.raises(RuntimeError, match="releasing the KV cache failed"):
        llm.loop.close()
    waiter, outcome = in_thread(lambda: llm.loop.wait(group))
    waiter.join(timeout=5)
    assert not waiter.is_alive(), "the aborted caller was never woken"
    assert isinstance(outcome.get("error"), EngineClosed)


def test_a_callers_failing_poll_fails_that_call_alone(llm):
    """``wait``'s poll is the caller's code: raising on the driving thread ends that caller's requests only."""
    expected = llm.generate([[4, 5, 6]], LONG, use_tqdm=False)[0]["token_ids"]
    own = llm.loop.submit(llm.sequences([[7, 8, 9]], [LONG]))
    other = llm.loop.submit(llm.sequences([[4, 5, 6]], [LONG]))

    def poll(group):
        raise ValueError("progress bar broke")

    with pytest.raises(ValueError, match="progress bar broke"):
        llm.loop.wait(own, poll=poll, poll_interval_s=0.0)  # this thread drives: both groups are running
    assert [seq.completion_token_ids for seq in llm.loop.wait(other)] == [expected]


def test_a_failing_on_news_callback_leaves_the_other_groups_served(llm):
    """``on_news`` is a caller's wake-up hook: its failure must not stop the loop before the groups finishing in
    the same step are woken, nor fail other callers."""
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    def broken():
        raise RuntimeError("on_news failed")

    noisy = llm.loop.submit(llm.sequences([[7, 8, 9]], [params]), on_news=broken)
    quiet = llm.loop.submit(llm.sequences([[7, 8, 9, 10]], [params]))  # finishes in the same step as noisy
    waiter, outcome = in_thread(lambda: llm.loop.wait(quiet))
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "a group finishing beside a failing callback was never woken"
    assert "error" not in outcome, outcome.get("error")
    assert noisy.done.is_set() and len(outcome["result"][0].completion_token_ids) == 5


def test_a_stream_collected_while_its_thread_holds_the_loops_lock_aborts_without_deadlock():
    """The cyclic collector may finalize an abandoned stream at any allocation, also inside the loop's locked
    bookkeeping; its abort must not wait on that lock (a deadlock of every caller) and must still happen."""
    import gc

    llm = LLM(tiny_model("qwen3"), **SMALL_ENGINE)  # not closed if it deadlocks: closing would wait on the lock

    def abandon_in_a_cycle():
        stream = llm.stream([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=900, ignore_eos=True))
        next(stream)
        holder = [stream]
        holder.append(holder)  # only the cyclic collector frees it

    abandon_in_a_cycle()
    (group,) = set(llm.loop._group_of.values())

    def collect_inside_the_lock():
        with llm.loop._mailbox.lock:
            gc.collect()

    collector, outcome = in_thread(collect_inside_the_lock)
    collector.join(timeout=5)
    assert not collector.is_alive(), "collecting a stream inside the loop's lock deadlocked"
    assert "error" not in outcome, outcome.get("error")
    assert group.done.wait(timeout=5), "the abandoned stream was never aborted"
    assert group.seqs[0].finish_reason is FinishReason.ABORT
    assert len(llm.generate([[4, 5, 6]], LONG, use_tqdm=False)[0]["token_ids"]) == 60
    llm.close()
