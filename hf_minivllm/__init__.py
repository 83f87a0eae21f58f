"""hf-minivllm: existing transformers generation code, served by a vLLM-class engine."""
from hf_minivllm.accelerate import accelerate, reset_prefix_cache, restore, stats
from hf_minivllm.config import Config
from hf_minivllm.llm import LLM
from hf_minivllm.sampling_params import SamplingParams

__all__ = ["LLM", "Config", "SamplingParams", "accelerate", "reset_prefix_cache", "restore", "stats"]
__version__ = "0.1.0"
