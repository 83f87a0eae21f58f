"""Mixed steps: running requests decode in every step while waiting prompts prefill in chunks beside them."""
import copy

import pytest
import torch

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine.cuda_graphs import PrefillGraphs
from conftest import FAMILIES, tiny_model

# Few sequences at once and a small token budget: requests wait while others run, and prompts arrive in chunks.
ENGINE = dict(num_kvcache_blocks=256, kvcache_block_size=4, max_num_seqs=4, max_model_len=128,
              max_num_batched_tokens=128)


def prompts(shared_prefix: bool, count: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 320, (24,), generator=generator).tolist() if shared_prefix else []
    return [prefix + torch.randint(3, 320, (int(n),), generator=generator).tolist()
            for n in torch.randint(5, 60, (count,), generator=generator)]


def recorded_steps(llm):
    """(decode rows, prefill rows) of every step the runner launches."""
    steps, launch = [], llm.engine.runner.launch

    def spy(batch, previous=None):
        running = [count == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens
                   for seq, count in zip(batch.seqs, batch.num_new_tokens)]
        steps.append((sum(running), len(running) - sum(running)))
        return launch(batch, previous)

    llm.engine.runner.launch = spy
    return steps


class EagerDecodeGraphs:
    """Stands in for the runner's CUDA decode graphs on the CPU (same interface, eager forward), so a mixed step
    takes the path it takes on a GPU: decode rows through the "graph", prompts in a second pass."""

    def __init__(self, runner):
        self.runner = runner
        self.decode_rows = []  # rows of every decode pass, pure decode steps and mixed steps' decode parts

    def can_run(self, batch_size):
        return True

    def run(self, inputs, shared_prefix_len=0):
        self.decode_rows.append(inputs.rows.shape[1])
        return self.runner.eager_decode_logits(inputs, shared_prefix_len)


def eager_prefill_graphs(runner, max_tokens: int = 64, max_seqs: int = 3) -> PrefillGraphs:
    """The runner's prefill graphs as on a GPU (static buffers, padded tokens and sequences), run eagerly."""
    runner.prefill_graphs = PrefillGraphs(runner, max_tokens, max_seqs, capture=False)
    return runner.prefill_graphs


@pytest.mark.parametrize("passes", ["one-pass", "decode-graph-pass", "both-graphs"])
@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_mixed_steps_are_token_exact_with_separate_prefill_and_decode_steps(family, shared_prefix, async_scheduling,
                                                                             passes):
    model = tiny_model(family)
    batch = prompts(shared_prefix)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    settings = dict(ENGINE, async_scheduling=async_scheduling)
    separate = LLM(copy.deepcopy(model), mixed_steps=False, **settings)
    mixed = LLM(model, **settings)
    if passes != "one-pass":
        mixed.engine.runner.graphs = EagerDecodeGraphs(mixed.engine.runner)
    if passes == "both-graphs":
        prefill_graphs = eager_prefill_graphs(mixed.engine.runner)
    steps = recorded_steps(mixed)
    expected = separate.generate(batch, params, use_tqdm=False)
    assert mixed.generate(batch, params, use_tqdm=False) == expected
    assert any(decode and prefill for decode, prefill in steps), "some steps must mix decode and prefill rows"
    if passes == "both-graphs":
        assert 0 < prefill_graphs.replays < sum(1 for _, prefill in steps if prefill), "some prompt passes fit, some not"
    if shared_prefix:  # cached prefixes are reused in mixed steps too
        assert mixed.stats.prefix_cache_hit_tokens > 0
        assert mixed.stats.prefix_cache_hit_tokens == separate.stats.prefix_cache_hit_tokens


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_mixed_steps_with_decode_graph_pass_are_token_exact_under_preemption(async_scheduling):
    """Preempted sequences come back through a mixed step's prompt pass with new block tables; their decode rows
    must then read those, not the tables they had before."""
    model = tiny_model("qwen3")
    batch = prompts(False, count=12, seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # No prefix cache: a recomputed sequence then gets other blocks than it had, so stale tables would show.
    settings = dict(ENGINE, num_kvcache_blocks=40, enable_prefix_caching=False, async_scheduling=async_scheduling)
    separate = LLM(copy.deepcopy(model), mixed_steps=False, **settings)
    mixed = LLM(model, **settings)
    graphs = mixed.engine.runner.graphs = EagerDecodeGraphs(mixed.engine.runner)
    scheduled, launch = [], mixed.engine.runner.launch

    def spy(step, previous=None):
        scheduled.append((step.num_decode, len(step.seqs) - step.num_decode) if step.is_prefill else (len(step.seqs), 0))
        return launch(step, previous)

    mixed.engine.runner.launch = spy
    assert mixed.generate(batch, params, use_tqdm=False) == separate.generate(batch, params, use_tqdm=False)
    assert mixed.stats.preemptions > 0
    assert any(decode and prefill for decode, prefill in scheduled), "some steps must mix decode and prefill rows"
    assert graphs.decode_rows == [decode for decode, _ in scheduled if decode], "every step's decode rows ran in the graph"


def test_a_long_prompt_never_stalls_running_requests():
    model = tiny_model("qwen3")
    llm = LLM(model, num_kvcache_blocks=256, kvcache_block_size=4, max_model_len=512, max_num_batched_tokens=40)
    steps = recorded_steps(llm)
    short = [[5 + i, 6, 7, 8] for i in range(3)]
    long_prompt = torch.randint(3, 320, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 3
    params.append(SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    outputs = llm.generate(short + [long_prompt], params, use_tqdm=False)
    assert [len(out["token_ids"]) for out in outputs] == [30, 30, 30, 2]
    chunks = [(decode, prefill) for decode, prefill in steps if prefill]
    assert len(chunks) >= 300 // 40, "the long prompt is prefilled in chunks within the token budget"
    assert all(decode == 3 for decode, _ in chunks[1:]), "the running requests decode in every chunk's step"


def test_mixed_steps_setting_is_checked():
    from hf_minivllm import Config

    with pytest.raises(ValueError, match="mixed_steps"):
        Config(mixed_steps="yes")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_prompt_prefilled_in_chunks_gives_its_blocks_back_before_a_running_request_starves(async_scheduling):
    """Each request fits the 10-block cache alone. The long prompt, admitted in chunks beside the running request,
    holds all its prompt blocks while it waits for its next chunk; the running request's next block must then come
    from it, not from preempting the running request itself (which left nothing to run)."""
    model = tiny_model("qwen3")
    running, long_prompt = [5, 6, 7, 8], list(range(10, 46))
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
    expected = LLM(copy.deepcopy(model), async_scheduling=False, mixed_steps=False,
                   num_kvcache_blocks=2048).generate([running, long_prompt], params, use_tqdm=False)
    llm = LLM(model, async_scheduling=async_scheduling, enable_prefix_caching=False, kvcache_block_size=4,
              num_kvcache_blocks=10, max_num_batched_tokens=8)
    assert llm.generate([running, long_prompt], params, use_tqdm=False) == expected
    assert llm.stats.preemptions > 0


@pytest.mark.parametrize("family", ["gemma2", "qwen3_moe"])
def test_prefill_graphs_pass_serves_sliding_windows_and_experts_token_exact(family):
    """Padded tokens in a prefill graph's pass go through sliding-window attention and expert routing too."""
    if family == "qwen3_moe" and "qwen3_moe" not in FAMILIES:
        pytest.skip("Qwen3-MoE is served on transformers 5 only")
    model = tiny_model(family)
    batch = prompts(False, count=8, seed=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eager = LLM(copy.deepcopy(model), **ENGINE)
    graphed = LLM(model, **ENGINE)
    graphed.engine.runner.graphs = EagerDecodeGraphs(graphed.engine.runner)
    prefill_graphs = eager_prefill_graphs(graphed.engine.runner, max_tokens=128, max_seqs=4)  # every prefill step
    assert graphed.generate(batch, params, use_tqdm=False) == eager.generate(batch, params, use_tqdm=False)
    assert prefill_graphs.replays > 0


def test_prefill_graph_buckets_and_setting_are_checked():
    from hf_minivllm import Config
    from hf_minivllm.engine.cuda_graphs import prefill_buckets

    assert prefill_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert prefill_buckets(100) == [16, 32, 64, 100]
    assert prefill_buckets(0) == []
    with pytest.raises(ValueError, match="max_prefill_graph_tokens"):
        Config(max_prefill_graph_tokens=-1)
