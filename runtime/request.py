"""A request's host-side state while the scheduler owns it."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from runtime.detokenizer import OutputText
from runtime.grammar import RequestGrammar
from runtime.io_struct import EngineRequest
from runtime.output_deltas import DeltaCallback, OutputDeltas
from runtime.radix_cache import TreeNode


@dataclasses.dataclass(eq=False)
class Req:
    """Everything the scheduler tracks for one `EngineRequest`.

    `all_ids` is the prompt plus every output token read back so far;
    `num_computed` counts tokens whose KV is written or will be written by a step
    already dispatched; `inflight` counts sampled tokens not yet read back (the
    host runs one step behind the device).
    """

    request: EngineRequest
    callback: DeltaCallback  # each output as what is new since the previous one (`deltas` cuts them)
    max_new_tokens: int
    seed: int
    eos_ids: frozenset[int]
    all_ids: list[int] = dataclasses.field(default_factory=list)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    inflight: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    locked_node: TreeNode | None = None
    cached_tokens: int = 0
    penalty_slot: int = 0  # row of the runner's per-request device state: penalty counts, last token
    finished: bool = False
    finish_reason: dict | None = None
    detokenize: bool = True  # False: text only where stop strings need it (the HTTP process makes it)
    output_text: OutputText | None = None
    text: str = ""
    stop_scan_from: int = 0
    last_streamed: int = 0
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_decode_step: int = 0  # the scheduler's count of decode steps when this row last ran in one
    output_logprobs: list[tuple[float | None, int]] = dataclasses.field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)
    output_ids_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)
    input_logprobs: list[tuple[float | None, int]] = dataclasses.field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = dataclasses.field(default_factory=list)
    input_ids_logprobs: list[list[tuple[float, int]] | None] = dataclasses.field(default_factory=list)
    hidden_states: list[list[float]] = dataclasses.field(default_factory=list)
    embedding: list[float] | None = None
    grammar: RequestGrammar | None = None  # structured output: what may be sampled next
    deltas: OutputDeltas = dataclasses.field(default_factory=OutputDeltas, repr=False)
    # `pages` as int32 (`page_row`), and the list it was made from
    _page_row: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32), repr=False)
    _page_row_of: list[int] | None = dataclasses.field(default=None, repr=False)

    def page_row(self) -> np.ndarray:
        """`pages` as an int32 array, kept while they do not change: a decode row's page-table row
        is copied in every step, and converting the list each time cost the serving loop about
        0.2 ms a step at 64 rows of 100+ pages on the 2-core box. `pages` only grows or is
        replaced by another list, so the same list at the same length is the same pages."""
        if self._page_row_of is not self.pages or len(self._page_row) != len(self.pages):
            self._page_row = np.asarray(self.pages, np.int32)
            self._page_row_of = self.pages
        return self._page_row

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def prompt_len(self) -> int:
        return len(self.request.input_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to feed: 1 means a decode row, more means a prefill chunk."""
        return len(self.all_ids) + self.inflight - self.num_computed

    @property
    def produced(self) -> int:
        """Output tokens sampled so far, read back or not."""
        return len(self.output_ids) + self.inflight

    @property
    def is_generation(self) -> bool:
        return self.request.kind == "generate"

    @property
    def samples(self) -> bool:
        """Whether the request wants tokens: with max_new_tokens 0 a generation only reads its
        prompt (for input logprobs), like a pooling request, and ends after its last chunk."""
        return self.is_generation and self.max_new_tokens > 0
