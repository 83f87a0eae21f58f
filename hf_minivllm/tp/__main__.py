"""``python -m hf_minivllm.tp``: the entry point of a tensor-parallel worker process (see ``worker``)."""
from hf_minivllm.tp.worker import main

main()
