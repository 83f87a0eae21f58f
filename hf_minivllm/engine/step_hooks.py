"""Running requests' ``SamplingParams.step_hook`` on their logits rows; the runner calls this only while some
request carries a hook (``ScheduledBatch.has_step_hooks``)."""
from __future__ import annotations

import torch

from hf_minivllm.engine.sequence import Sequence


def apply_step_hooks(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[list[Sequence], BaseException]]:
    """Replace, in place, the rows of hooked requests (``logits[i]`` belongs to ``seqs[i]``) by what their hook
    returns.

    Requests sharing one hook object go to it in one call, in batch order. A hook that raises leaves its rows as
    they were; its requests and the exception are returned, for the engine to end those requests alone.
    """
    failures = []
    groups: dict[int, list[int]] = {}
    for row, seq in enumerate(seqs):
        if seq.sampling_params.step_hook is not None:
            groups.setdefault(id(seq.sampling_params.step_hook), []).append(row)
    for rows in groups.values():
        hook = seqs[rows[0]].sampling_params.step_hook
        index = torch.tensor(rows, device=logits.device)
        hooked = [seqs[row] for row in rows]
        try:
            processed = hook.process_logits(hooked, logits.index_select(0, index))
            logits.index_copy_(0, index, processed.to(device=logits.device, dtype=logits.dtype))
        except Exception as error:  # noqa: BLE001 - the hook's own failure, handed to its caller
            failures.append((hooked, error))
    return failures
