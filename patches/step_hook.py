"""HF's own logits processors and stopping criteria, run every step on the engine's rows of one ``generate`` call.

HF's decoding loop calls ``logits_processor(input_ids, logits)`` and ``stopping_criteria(input_ids, scores)`` on the
whole batch, ``input_ids`` being the left-padded prompts (pads included) plus every token generated so far, with
``pad_token_id`` after a row finished. ``HFStepHook`` rebuilds exactly that tensor from the engine's sequences, so
every processor (built-in or the user's) sees what it would see under HF: same rows, same order, same history.

The hook asks the engine to step a call's rows together (``lockstep``): prompts prefilled over several steps wait for
each other, so the processors see the whole batch once per step, as under HF, and a processor with state of its
own (a call counter, a constraint's automaton) sees what it would see there. Where the engine cannot keep the rows
together (more rows than it runs at once, a KV cache too small for all of them, a preempted row recomputed later),
rows are handed to the processors in groups of equal length, each time inside the full batch: absent rows carry
their own history cut or pad-filled to that length and zero logits, and their results are discarded. Stateless
processors (all of HF's that the engine serves) give the same result either way.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from hf_minivllm.engine.sequence import Sequence


class HFStepHook:
    """The ``SamplingParams.step_hook`` of one generate call: its processors, its stopping criteria, and what HF
    records along the way (per-step scores and logits, which rows finished when).

    ``keep_finished_rows``: rows that finished stay in the engine until every row did, as in HF's loop, so that the
    processors and the recorded scores see them too (needed for ``output_scores``/``output_logits``, and when no
    eos criterion exists HF even keeps generating real tokens for them). ``pad_finished_rows``: such a row's token
    is ``pad_token_id`` (HF does this exactly when an eos criterion is present).
    """

    lockstep = True  # the engine steps this call's rows together where it can (see the module doc)

    def __init__(
        self,
        input_ids: torch.Tensor,
        processors: Any,
        criteria: Any,
        pad_token_id: int | None,
        max_new_tokens: int,
        keep_finished_rows: bool,
        pad_finished_rows: bool,
        record_scores: bool,
        record_logits: bool,
    ):
        num_rows, self.width = input_ids.shape
        self.device = input_ids.device
        self.processors = processors
        self.criteria = criteria
        self.pad_token_id = pad_token_id
        self.keep_finished_rows = keep_finished_rows
        self.pad_finished_rows = pad_finished_rows and pad_token_id is not None
        filler = pad_token_id if pad_token_id is not None else 0
        self.history = torch.full((num_rows, self.width + max_new_tokens), filler, dtype=torch.long, device=self.device)
        self.history[:, : self.width] = input_ids
        self.written = [0] * num_rows  # generated tokens copied into ``history`` per row
        self.done = [False] * num_rows  # HF's ``unfinished_sequences``, inverted
        self.finish_length = [0] * num_rows  # generated tokens when the row was done
        self.scores: list[torch.Tensor] | None = [] if record_scores else None
        self.logits: list[torch.Tensor] | None = [] if record_logits else None
        self.row_of: dict[int, int] = {}

    @property
    def num_rows(self) -> int:
        return len(self.done)

    def bind(self, seqs: list[Sequence]) -> None:
        """Map the engine's sequences (row order) to rows; called once they are queued, before the first step."""
        self.row_of = {seq.seq_id: row for row, seq in enumerate(seqs)}

    def _groups(self, seqs: list[Sequence]) -> dict[int, list[tuple[int, int]]]:
        """``(position in seqs, row)`` pairs grouped by how many tokens the row generated so far."""
        groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for position, seq in enumerate(seqs):
            groups[seq.num_completion_tokens].append((position, self.row_of[seq.seq_id]))
        return groups

    def _sync_history(self, seqs: list[Sequence]) -> None:
        """Copy tokens the rows generated since the last call into ``history`` (one index_put)."""
        rows, columns, tokens = [], [], []
        for seq in seqs:
            row = self.row_of[seq.seq_id]
            new = seq.token_ids[seq.num_prompt_tokens + self.written[row] :]
            if new:
                start = self.width + self.written[row]
                rows.extend([row] * len(new))
                columns.extend(range(start, start + len(new)))
                tokens.extend(new)
                self.written[row] += len(new)
        if tokens:
            index = (torch.tensor(rows, device=self.device), torch.tensor(columns, device=self.device))
            self.history.index_put_(index, torch.tensor(tokens, dtype=torch.long, device=self.device))

    def _full_batch(self, values: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``values`` (one per row in ``rows``) placed in a fresh batch-sized tensor, zeros for absent rows."""
        if rows == list(range(self.num_rows)):
            return values.to(self.device, copy=True)
        full = values.new_zeros((self.num_rows, *values.shape[1:]), device=self.device)
        full[torch.tensor(rows, device=self.device)] = values.to(self.device)
        return full

    def _record(self, store: list[torch.Tensor], step: int, rows: list[int], full: torch.Tensor) -> None:
        """Keep rows ``rows`` of this step's batch-sized ``full`` as HF's per-step tensor ``store[step]``."""
        if step == len(store) and rows == list(range(self.num_rows)):
            store.append(full)
            return
        while len(store) <= step:
            store.append(torch.zeros_like(full))
        index = torch.tensor(rows, device=self.device)
        store[step][index] = full[index]

    def process_logits(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        self._sync_history(seqs)
        result = torch.empty_like(logits)
        for step, members in self._groups(seqs).items():
            positions = [position for position, _ in members]
            rows = [row for _, row in members]
            position_index = torch.tensor(positions, device=logits.device)
            # HF passes its own copy of the logits to the processors and records that same tensor as the raw logits,
            # so a processor that edits it in place shows in ``logits`` there too: record after processing.
            raw = self._full_batch(logits.index_select(0, position_index), rows)
            scores = self.processors(self.history[:, : self.width + step], raw)
            if self.logits is not None:
                self._record(self.logits, step, rows, raw)
            if self.scores is not None:
                self._record(self.scores, step, rows, scores)
            chosen = scores[torch.tensor(rows, device=self.device)]
            if self.pad_finished_rows:
                finished = [i for i, row in enumerate(rows) if self.done[row]]
                if finished:
                    chosen[finished] = float("-inf")
                    chosen[finished, self.pad_token_id] = 0.0
            result.index_copy_(0, position_index, chosen.to(device=logits.device, dtype=logits.dtype))
        return result

    def should_stop(self, seqs: list[Sequence]) -> list[bool]:
        self._sync_history(seqs)
        for step, members in self._groups(seqs).items():
            recorded = tuple(self.scores[:step]) if self.scores is not None else None
            is_done = self.criteria(self.history[:, : self.width + step], recorded).tolist()
            for _, row in members:
                if not self.done[row] and is_done[row]:
                    self.done[row] = True
                    self.finish_length[row] = step
        if self.keep_finished_rows:
            # HF's loop runs every row until the last one is done: rows behind that step keep going
            if not all(self.done):
                return [False] * len(seqs)
            last = max(self.finish_length)
            return [seq.num_completion_tokens >= last for seq in seqs]
        return [self.done[self.row_of[seq.seq_id]] for seq in seqs]

    def generated_length(self, row: int, num_generated: int) -> int:
        """How many of the row's ``num_generated`` tokens HF's output holds. A done row is padded from where it was
        done when HF pads (an eos criterion exists); otherwise HF goes on generating real tokens for it until the
        last row is done."""
        if self.pad_finished_rows:
            return self.finish_length[row] if self.done[row] else num_generated
        if all(self.done):
            return min(num_generated, max(self.finish_length))
        return num_generated

    def recorded(self, num_steps: int) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """HF's ``scores`` and ``logits`` tuples for a call that ran ``num_steps`` steps (None where not asked for)."""
        scores = tuple(self.scores[:num_steps]) if self.scores is not None else None
        logits = tuple(self.logits[:num_steps]) if self.logits is not None else None
        return scores, logits
