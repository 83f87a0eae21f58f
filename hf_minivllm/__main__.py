"""``python -m hf_minivllm serve [MODEL]``: see ``hf_minivllm.serve.cli``."""
import sys

from hf_minivllm.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
