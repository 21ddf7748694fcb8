"""The host-side description of one device step, and the bucket sizes that keep shapes few.

The scheduler fills a `ScheduledBatch` with numpy arrays already padded to
buckets; the model runner only moves it to the device and runs it. Keeping this
record plain (no device arrays, no requests) lets each side be tested alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from runtime.sampling import SamplingBatch

# Narrower page tables save little gather work and would multiply programs.
MIN_PAGE_TABLE_WIDTH = 8
# With a prefill chunk in the batch the decode rows pad to at least this many (the chunk dwarfs them).
MIN_MIXED_DECODE_ROWS = 8
# On a CPU, a step may run on a compiled program this much larger (tokens, decode rows, width) while
# its own compiles. Off a CPU any larger one will do (`StepPrograms`).
MAX_BORROW_FACTOR = 2
# Off a CPU, the warm-up compiles mixed programs this many decode rows deep (and the most) to hold a
# burst's steps (`burst_shapes`).
BURST_DECODE_ROWS = 64


def next_power_of_two(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def power_of_two_buckets(minimum: int, maximum: int) -> list[int]:
    """Powers of two from `minimum` up to the first one >= `maximum`."""
    buckets = [minimum]
    while buckets[-1] < maximum:
        buckets.append(buckets[-1] * 2)
    return buckets


def stepped_buckets(minimum: int, maximum: int, quarter_from: int) -> list[int]:
    """Powers of two from `minimum`, with the half step between them from `quarter_from // 2`
    and the quarter steps from `quarter_from` (16: 8, 12, 16, 20, 24, 28, 32, 40...)."""
    buckets = []
    for low in power_of_two_buckets(minimum, maximum):
        steps = (4, 5, 6, 7) if low >= quarter_from else (4, 6) if low >= quarter_from // 2 else (4,)
        buckets.extend(size for size in (low * step // 4 for step in steps) if size <= maximum or size == low)
    return sorted(set(buckets))


def width_buckets(minimum: int, maximum: int) -> list[int]:
    """Page-table widths: powers of two, and from 16 pages up the quarter steps between them.

    The decode rows' page gather and attention dominate batched decode on CPU and
    grow with the padded width, so a width padded by at most 1.25x (instead of 2x)
    pays for the extra programs: batch-32 decode at 300 tokens of context, width
    20 instead of 24 pages, 70.6 -> 65.8 ms per step on the 2-core box.
    """
    return stepped_buckets(minimum, maximum, quarter_from=16)


def prefill_token_buckets(chunk_tokens: int) -> list[int]:
    """Padded prefill tokens per step: powers of two from 16, and from 256 up the quarter steps.

    Every padded token runs through every matmul, so a 300-token prompt padded to 512
    (or a step of 1244 prompt tokens padded to 2048) spends 40% of its step on padding;
    quarter steps bound the waste at 1.25x where the compute matters.
    """
    return stepped_buckets(16, chunk_tokens, quarter_from=256)


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding n; n beyond the last bucket is a scheduler bug."""
    for bucket in buckets:
        if n <= bucket:
            return bucket
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class Buckets:
    """Every padded size a step can take; their product bounds the compiled programs."""

    decode_seqs: list[int]  # includes 0
    prefill_seqs: list[int]  # includes 0
    prefill_tokens: list[int]  # includes 0
    page_table_width: list[int]

    @classmethod
    def build(
        cls, max_running: int, max_prefill_seqs: int, chunk_tokens: int, max_pages_per_seq: int
    ) -> Buckets:
        return cls(
            decode_seqs=[0, *power_of_two_buckets(1, max_running)],
            prefill_seqs=[0, *power_of_two_buckets(1, max_prefill_seqs)],
            prefill_tokens=[0, *prefill_token_buckets(chunk_tokens)],
            page_table_width=width_buckets(min(MIN_PAGE_TABLE_WIDTH, max_pages_per_seq), max_pages_per_seq),
        )

    def max_programs(self) -> int:
        """An upper bound on the step programs: each (decode, prefill seqs, prefill q, width) combination."""
        decode_only = len(self.decode_seqs) - 1
        mixed_decode = 1 + sum(1 for n in self.decode_seqs if n >= MIN_MIXED_DECODE_ROWS)
        q_lens = len(self.prefill_tokens) - 1
        with_prefill = mixed_decode * (len(self.prefill_seqs) - 1) * q_lens * q_lens
        return (decode_only + with_prefill) * len(self.page_table_width)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The padded sizes a step program is specialised on."""

    decode: int  # decode rows
    prefill_seqs: int
    prefill_tokens: int
    max_q: int  # the longest prefill chunk, padded (0: a decode-only step)
    width: int  # page-table columns

    @property
    def tokens(self) -> int:
        return self.decode + self.prefill_tokens

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """(tokens, seqs, page-table width, decode rows, max q), as the logs print it."""
        return (self.tokens, self.decode + self.prefill_seqs, self.width, self.decode, self.max_q)

    def holds(self, other: StepShape) -> bool:
        """Whether a step of shape `other` fits this shape's program: every size at least as large.

        The extra decode rows, sequences and tokens are padding, as bucket padding is.
        """
        return (
            self.decode >= other.decode
            and self.prefill_seqs >= other.prefill_seqs
            and self.prefill_tokens >= other.prefill_tokens
            and self.max_q >= other.max_q
            and self.width >= other.width
        )


def borrowable_shape(
    need: StepShape, compiled: Iterable[StepShape], max_factor: float | None = MAX_BORROW_FACTOR
) -> StepShape | None:
    """The cheapest compiled shape that holds `need` at most `max_factor` larger (None: any
    larger), else None.

    Larger means tokens, decode rows (from MIN_MIXED_DECODE_ROWS) and page-table
    width; a decode-only step borrows only decode-only programs.

    Running a step padded further costs a little (every padded token goes through the
    matmuls: on a CPU a step's time grows with them); compiling its own program first
    stalls every running request for a second or two (0.5-2.5 s a program on the 2-core
    box and on an H200, where a step takes milliseconds).
    """
    limit = float("inf") if max_factor is None else max_factor
    fits = [
        shape
        for shape in compiled
        if shape.holds(need)
        and (shape.max_q == 0) == (need.max_q == 0)  # decode-only steps keep their own attention path
        and shape.tokens <= limit * need.tokens
        and shape.decode <= limit * max(need.decode, MIN_MIXED_DECODE_ROWS)
        and shape.width <= limit * need.width
    ]
    return min(fits, key=lambda s: (s.tokens, s.width, s.prefill_seqs, s.max_q), default=None)


def burst_shapes(buckets: Buckets, page_size: int, longest_prompt: int) -> list[StepShape]:
    """Step shapes that hold a burst's steps, for a warm-up where borrowing has no size limit.

    A burst of requests meets mixed steps (prompts beside the decode rows of those
    before them) whose shapes depend on how it arrives: an H200's first burst of 64
    requests met five, each compiled inline while every request waited (TTFT 4.8 s;
    docs/benchmarks.md, fifth GPU session), then decode steps of page-table widths the
    warm-up had not compiled. These hold every mixed step of up to the most prompts a
    step takes, each up to `longest_prompt` tokens, among decode rows up to twice that
    deep, and every decode step that deep: at BURST_DECODE_ROWS decode rows and at the
    most. A step borrows the smallest that holds it while its own program compiles aside.
    """
    seqs = buckets.prefill_seqs[-1]
    tokens = bucket_for(min(seqs * longest_prompt, buckets.prefill_tokens[-1]), buckets.prefill_tokens)
    max_q = min(next_power_of_two(longest_prompt, 16), tokens)
    widths = buckets.page_table_width
    width = bucket_for(min(-(-2 * longest_prompt // page_size), widths[-1]), widths)
    most = buckets.decode_seqs[-1]
    decode_rows = {bucket_for(min(BURST_DECODE_ROWS, most), buckets.decode_seqs), most}
    mixed = [StepShape(decode, seqs, tokens, max_q, width) for decode in sorted(decode_rows)]
    return mixed + [StepShape(decode, 0, 0, 0, width) for decode in sorted(decode_rows)]


def sampler_rows(seqs: int) -> int:
    """Rows of a step's sampler: its sequences to a power of two. Decode-only and prefill-only
    steps have that already; a mixed step (8 decode rows and a prompt: 9) then shares the decode
    buckets' samplers instead of compiling two of its own (0.7-0.9 s each on the 2-core box)."""
    return next_power_of_two(seqs)


def step_shape(
    buckets: Buckets, page_size: int, num_decode: int, prefill_takes: list[int], kv_after: list[int]
) -> StepShape:
    """The padded shape of a step of `num_decode` decode rows and prefill chunks of `prefill_takes`
    tokens, whose sequences hold `kv_after` tokens each once it ran (decode rows first)."""
    decode = bucket_for(num_decode, buckets.decode_seqs)
    if prefill_takes and num_decode:
        wanted = min(max(num_decode, MIN_MIXED_DECODE_ROWS), buckets.decode_seqs[-1])
        decode = bucket_for(wanted, buckets.decode_seqs)
    prefill_tokens = bucket_for(sum(prefill_takes), buckets.prefill_tokens)
    max_q = min(next_power_of_two(max(prefill_takes), 16), prefill_tokens) if prefill_takes else 0
    width = bucket_for(max(-(-kv // page_size) for kv in kv_after), buckets.page_table_width)
    prefill_seqs = bucket_for(len(prefill_takes), buckets.prefill_seqs)
    return StepShape(decode, prefill_seqs, prefill_tokens, max_q, width)


@dataclasses.dataclass
class ScheduledBatch:
    """One step: decode rows first (one token each), then prefill chunks, all padded."""

    input_ids: np.ndarray  # int32[T]: host-known tokens
    token_source: np.ndarray  # int32[T]: request slot whose last sampled token (on device) to use, or -1
    positions: np.ndarray  # int32[T]
    cu_q_lens: np.ndarray  # int32[S + 1]
    kv_lens: np.ndarray  # int32[S]
    page_table: np.ndarray  # int32[S, P]
    write_slots: np.ndarray  # int32[T]
    num_tokens: int
    num_decode_seqs: int  # padded decode rows (static)
    max_prefill_q_len: int  # static
    sample_rows: np.ndarray  # int32[S]: flat index of each sequence's last token
    sample_valid: np.ndarray  # bool[R], R = sampler_rows(S): the row's token is really wanted
    sampling: SamplingBatch  # numpy arrays of R rows: one per sequence, then padding
    grammar_masks: np.ndarray | None = None  # int32[R, W] when a row has a grammar (`grammar_masks`)

    @property
    def num_padded_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def step_shape(self) -> StepShape:
        """The shape of the step program that runs this batch."""
        seqs = int(self.kv_lens.shape[0])
        return StepShape(
            decode=self.num_decode_seqs,
            prefill_seqs=seqs - self.num_decode_seqs,
            prefill_tokens=self.num_padded_tokens - self.num_decode_seqs,
            max_q=self.max_prefill_q_len,
            width=int(self.page_table.shape[1]),
        )

    def shape_key(self) -> tuple[int, ...]:
        """What the compiled programs are specialised on: the step's shape, then the sampler's ids width."""
        return (*self.step_shape().key, int(self.sampling.suppressed_ids.shape[1]))
