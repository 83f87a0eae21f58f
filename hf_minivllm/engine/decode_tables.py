"""Block tables of the running sequences as one numpy array, kept across decode steps and updated by appends.

Between two prefill steps a running sequence's block table only grows at its end (one block every ``block_size``
decode steps), so rebuilding a ``[batch, width]`` array from Python lists every step (the bulk of preparing a decode
step at batch 256) is wasted work: each sequence keeps a row here, and a step copies only the blocks added since the
last one, then gathers its rows in one indexing operation. A prefill gives its sequences new tables (admission,
recompute after preemption), so the runner calls ``clear`` on every prefill step, or ``forget`` on the prefilled
sequences of a mixed step whose decode rows keep theirs. A row is also rebuilt whenever its sequence's
``block_table_version`` moved on: a sequence can get a new table without a prefill row (a lockstep gang's member
whose prompt, all but its last token, is cached), and decoding through its old one would write into blocks it
no longer holds.
"""
from __future__ import annotations

import numpy as np

from hf_minivllm.engine.sequence import Sequence


class DecodeBlockTables:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int):
        self.table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.lengths = [0] * max_num_seqs  # blocks copied into each row
        self.versions = [0] * max_num_seqs  # the block_table_version each row was copied from
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))

    def clear(self) -> None:
        self.row_of.clear()
        self.free_rows = list(range(len(self.lengths) - 1, -1, -1))

    def forget(self, seqs: list[Sequence]) -> None:
        """Drop the rows of ``seqs`` (their tables are rebuilt from scratch when they next decode)."""
        for seq in seqs:
            row = self.row_of.pop(seq.seq_id, None)
            if row is not None:
                self.free_rows.append(row)

    def gather(self, seqs: list[Sequence]) -> np.ndarray:
        """The block tables of ``seqs``, ``[len(seqs), widest table]`` (zero-padded); frees departed sequences."""
        row_of, lengths, table, versions = self.row_of, self.lengths, self.table, self.versions
        if len(row_of) + len(seqs) > len(lengths):
            self._release_departed(seqs)
        rows = np.empty(len(seqs), dtype=np.int64)
        width = 0
        for index, seq in enumerate(seqs):
            row = row_of.get(seq.seq_id)
            if row is None:
                row = row_of[seq.seq_id] = self.free_rows.pop()
                versions[row] = -1  # the previous owner's blocks
            if versions[row] != seq.block_table_version:
                table[row, : lengths[row]] = 0
                lengths[row] = 0
                versions[row] = seq.block_table_version
            block_table = seq.block_table
            count = len(block_table)
            if count != lengths[row]:
                table[row, lengths[row] : count] = block_table[lengths[row] :]
                lengths[row] = count
            rows[index] = row
            width = max(width, count)
        return table[rows, :width]

    def _release_departed(self, seqs: list[Sequence]) -> None:
        present = {seq.seq_id for seq in seqs}
        for seq_id in [seq_id for seq_id in self.row_of if seq_id not in present]:
            self.free_rows.append(self.row_of.pop(seq_id))


def shared_prefix_blocks(tables: np.ndarray, context_lens: np.ndarray, block_size: int) -> int:
    """How many leading block-table entries every row holds alike (prefix caching's shared pages), counting only
    blocks before each row's last token, so that every row keeps at least that token of its own."""
    limit = int(context_lens.min() - 1) // block_size
    if limit <= 0 or not (tables[:, 0] == tables[0, 0]).all():  # most batches share nothing: one column tells
        return 0
    same = (tables[:, :limit] == tables[0, :limit]).all(axis=0)
    return limit if same.all() else int(same.argmin())
