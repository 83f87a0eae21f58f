"""Online serving: ``AsyncLLM`` (requests arriving while the engine runs, each streamed to an asyncio task) and an
OpenAI-compatible HTTP server on it (``hf_minivllm.serve.app``, ``hf-minivllm serve``; needs the ``serve`` extra)."""
from hf_minivllm.serve.async_llm import AsyncLLM, ChoiceDelta, RequestOutput, RequestStream, TokenLogprob
from hf_minivllm.serve.metrics import RequestMetrics

__all__ = ["AsyncLLM", "ChoiceDelta", "RequestMetrics", "RequestOutput", "RequestStream", "TokenLogprob"]
