"""Greedy decoding with continuous batching over a slot KV cache, optionally replayed as CUDA graphs.

transformers' ``generate`` decodes a batch until its longest answer ends: rows that stopped early keep
their place, and a batch of answers of mixed lengths runs at the speed of its longest. Here every
running answer holds a *slot* (a row of a preallocated KV cache); when an answer stops, its slot is
refilled from the prompts still waiting, so the GPU keeps decoding full batches until the work runs out.

All slots write the key/value of their next token into the same column (``position``), which moves one
column to the right per step. A newly admitted prompt, prefilled on its own (``Prefill``), is copied into
its slot so that it ends at that column; its keys carry their rotary positions already, and each row sees
only its own columns through the attention mask, so where a row sits in the buffer changes nothing in its
arithmetic. When the column reaches the end of the buffer, the live columns are moved back to the start.
Attention reads only the columns up to the current one, rounded up to a ``WINDOW_STEP`` bucket.

A whole step stays on the device: the language model, the greedy choice (stop tokens masked below a row's
minimum length), the probability of the chosen token and the inputs of the next step. The host reads the
tokens back once per ``SYNC_STEPS`` steps and only then learns which answers ended (a row that ended
mid-way decodes a few tokens nobody reads). On a CUDA GPU each attention bucket's step is captured once as
a CUDA graph and replayed, so a step costs one launch instead of a few thousand, queued back to back.

Considered and not used: transformers' own continuous batching (``generate_batch``, paged attention)
takes token ids only, not the precomputed image features our prefill needs; vLLM and SGLang are serving
engines with their own model runners and schedulers, outside a Ray Data actor's process.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from actors.constraints import allowed_tokens, full_bitmask

logger = logging.getLogger(__name__)

WINDOW_STEP = 128  # attention-window buckets: one CUDA graph per bucket
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward: bounds its activations and its temporary cache
CPU_SLOTS = 64  # most answers decoded together on a CPU
SLOT_STEP = 16  # slot counts are rounded up to this, so that batches of similar size share a cache and its graphs
GPU_SLOTS = 256  # most answers decoded together on a GPU (also bounded by free memory)
GPU_MEMORY_SHARE = 0.6  # of the free GPU memory, what the slot cache may take
SYNC_STEPS = {"cuda": 8, "cpu": 1}  # decoding steps queued between two reads of their tokens by the host


@dataclass(frozen=True)
class DecodeRequest:
    prompt_length: int  # the prompt's tokens (its prefill width is at most the longest of its group)
    max_new_tokens: int
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens were generated
    matcher: Any = None  # the answer's grammar matcher (actors/constraints.py), or None: any token


@dataclass
class Decoded:
    tokens: list[int] = field(default_factory=list)  # generated, up to and including the stop token
    probabilities: list[float] = field(default_factory=list)  # of each token under the model (raw logits)
    milliseconds: float = 0.0  # from admission (prefill) to the last token


class Prefilled(NamedTuple):
    """A prefilled group of prompts: their KV cache (rows x width), their attention mask (rows x width, 1 =
    a real token) and the float32 logits of the next token of each row."""

    cache: Cache
    attention_mask: torch.Tensor
    logits: torch.Tensor


Prefill = Callable[[list[int]], Prefilled]  # request indices -> their prefilled group
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache], torch.Tensor]
# (input ids (S, 1), position ids (S, 1), boolean attention mask (S, 1, 1, window), cache) -> logits (S, vocab)


class SlotLayer(CacheLayerMixin):
    """One layer's slot cache: keys and values (slots, kv heads, columns, head dim). A decode step writes
    every slot's new key/value at ``position`` (a device scalar, so a CUDA graph replays it) and returns
    the columns up to ``window``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.position = keys, values, position
        self.window = keys.shape[2]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("slot cache layers are allocated up front")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.keys.index_copy_(2, self.position, key_states)
        self.values.index_copy_(2, self.position, value_states)
        return self.keys[:, :, : self.window], self.values[:, :, : self.window]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window, 0

    def get_seq_length(self) -> int:
        return self.window

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache:
    """The device state of the slots: keys and values (slots x columns) of every layer, the live-column
    mask, the write column, each slot's next input and position, its generated count and minimum length,
    and the tokens and probabilities of the steps since the host last read them; plus the captured decode
    graphs, one per attention window."""

    def __init__(
        self, shapes: list[tuple[int, int]], slots: int, columns: int, sync_steps: int, dtype: torch.dtype, device
    ) -> None:
        self.slots, self.columns, self.device = slots, columns, device
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.layers = [
            SlotLayer(
                torch.zeros(slots, heads, columns, head_dim, dtype=dtype, device=device),
                torch.zeros(slots, heads, columns, head_dim, dtype=dtype, device=device),
                self.position,
            )
            for heads, head_dim in shapes
        ]
        self.cache = Cache(layers=self.layers)
        self.live = torch.zeros(slots, columns, dtype=torch.bool, device=device)
        self.input_ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.generated = torch.zeros(slots, dtype=torch.long, device=device)
        self.min_new_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # steps since the last read
        self.tokens = torch.zeros(sync_steps, slots, dtype=torch.long, device=device)
        self.probabilities = torch.zeros(sync_steps, slots, dtype=torch.float32, device=device)
        self.bitmask: torch.Tensor | None = None  # allowed tokens of each slot's next step (set at first prefill)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def counters(self) -> list[torch.Tensor]:
        """The small tensors a step advances (saved around the warm-up run of a graph capture)."""
        return [self.input_ids, self.position_ids, self.generated, self.position, self.step_index]

    def set_window(self, window: int) -> None:
        for layer in self.layers:
            layer.window = window

    def mask(self, window: int) -> torch.Tensor:
        return self.live[:, None, None, :window]

    def shift(self, start: int, end: int) -> None:
        """Move columns [start, end) to [0, end - start) and clear the rest of the mask."""
        width = end - start
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                tensor[:, :, :width] = tensor[:, :, start:end].clone()
        self.live[:, :width] = self.live[:, start:end].clone()
        self.live[:, width:] = False

    def admit(self, slots: list[int], prefilled: Prefilled, end: int, first: Chosen, min_new_tokens: list[int]) -> None:
        """Copy a prefilled group into ``slots`` so that each row's last column is ``end - 1``, with its
        first generated token as the next input."""
        width = prefilled.attention_mask.shape[1]
        index = torch.tensor(slots, device=self.device)
        for layer, source in zip(self.layers, prefilled.cache.layers, strict=True):
            layer.keys[index, :, end - width : end] = source.keys.to(layer.keys.dtype)
            layer.values[index, :, end - width : end] = source.values.to(layer.values.dtype)
        mask = prefilled.attention_mask.to(self.device).bool()
        self.live[index] = False
        self.live[index, end - width : end] = mask
        self.position_ids[index, 0] = mask.long().sum(-1)
        self.input_ids[index, 0] = first.tokens
        self.generated[index] = 1
        self.min_new_tokens[index] = torch.tensor(min_new_tokens, device=self.device)


class Chosen(NamedTuple):
    tokens: torch.Tensor  # (rows,)
    probabilities: torch.Tensor  # (rows,)


def choose(logits: torch.Tensor, stop: torch.Tensor, early: torch.Tensor, bitmask: torch.Tensor) -> Chosen:
    """Greedy next token of each row among those its grammar allows (``bitmask``), stop tokens (``stop``: a
    vocabulary mask) excluded where ``early`` (below the row's minimum length), and its probability under
    the raw logits, as ``generate`` reports it with output_logits."""
    blocked = (early[:, None] & stop[None, :]) | ~allowed_tokens(bitmask, logits.shape[-1])
    scores = logits.masked_fill(blocked, -float("inf"))
    tokens = scores.argmax(-1)
    return Chosen(tokens, logits.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))


class SlotDecoder:
    """Greedy decoding of many prompts with continuous batching (see the module docstring). ``step`` runs
    the language model on one token per slot; ``cuda_graphs`` replays it as CUDA graphs on a GPU;
    ``max_slots`` caps the answers decoded at once (default: what fits)."""

    def __init__(
        self,
        step: DecodeStep,
        layer_shapes: list[tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
        cuda_graphs: bool,
        max_slots: int | None = None,
    ) -> None:
        self.step = step
        self.max_slots = max_slots
        self.layer_shapes = layer_shapes  # (kv heads, head dim) per layer
        self.dtype = dtype
        self.device = device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.sync_steps = SYNC_STEPS.get(device.type, 1)
        self.slot_cache: SlotCache | None = None
        self.stats: Counter[str] = Counter()  # steps, prefills, moves (back to the start), graphs captured
        self.graph_error: str | None = None  # why CUDA graphs were turned off, if they were

    def _bytes_per_column(self) -> int:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return sum(2 * heads * head_dim * itemsize for heads, head_dim in self.layer_shapes)

    def _slot_cache(self, requests: list[DecodeRequest]) -> SlotCache:
        """A slot cache for these requests: room for the longest prompt and answer, with a quarter more (at
        least two reads' worth of steps) so that moving the live columns back happens at most every quarter
        of that; as many slots as requests (in steps of SLOT_STEP), up to what fits. Kept between calls of
        the same shape, graphs included."""
        longest = max(r.prompt_length for r in requests) + max(r.max_new_tokens for r in requests)
        headroom = max(longest // 4, 2 * self.sync_steps)
        columns = -(-(longest + headroom + 1) // WINDOW_STEP) * WINDOW_STEP
        limit = CPU_SLOTS
        current = self.slot_cache
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            per_slot = columns * self._bytes_per_column()
            if current is not None:
                free += current.slots * current.columns * self._bytes_per_column()
            limit = min(GPU_SLOTS, int(free * GPU_MEMORY_SHARE) // per_slot)
            if limit < 1:
                raise torch.OutOfMemoryError(f"no room on the GPU for one answer of {longest} tokens")
        slots = min(-(-len(requests) // SLOT_STEP) * SLOT_STEP, limit, self.max_slots or limit)
        if current is None or (current.slots, current.columns) != (slots, columns):
            self.slot_cache = current = None  # freed before the new one is allocated
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            current = SlotCache(self.layer_shapes, slots, columns, self.sync_steps, self.dtype, self.device)
            self.slot_cache = current
        return current

    def _advance(self, slot_cache: SlotCache, window: int, stop: torch.Tensor) -> None:
        """One decoding step of every slot, entirely on the device (so that a CUDA graph replays it)."""
        slot_cache.live.index_fill_(1, slot_cache.position, True)
        arguments = (slot_cache.input_ids, slot_cache.position_ids, slot_cache.mask(window), slot_cache.cache)
        logits = self.step(*arguments).float()
        assert slot_cache.bitmask is not None  # set at the first prefill, before any step
        chosen = choose(logits, stop, slot_cache.generated < slot_cache.min_new_tokens, slot_cache.bitmask)
        slot_cache.tokens.index_copy_(0, slot_cache.step_index, chosen.tokens[None])
        slot_cache.probabilities.index_copy_(0, slot_cache.step_index, chosen.probabilities[None])
        slot_cache.input_ids.copy_(chosen.tokens[:, None])
        slot_cache.position_ids.add_(1)
        slot_cache.generated.add_(1)
        slot_cache.position.add_(1)
        slot_cache.step_index.add_(1)

    def _queue_step(self, slot_cache: SlotCache, window: int, stop: torch.Tensor) -> None:
        """Queue one step, eagerly or as a replay of the window's CUDA graph (captured on first use)."""
        slot_cache.set_window(window)
        if self.cuda_graphs and window not in slot_cache.graphs:
            try:
                self._capture(slot_cache, window, stop)
            except RuntimeError as error:  # a model whose step cannot be captured still decodes, eagerly
                self.cuda_graphs = False
                self.graph_error = f"{type(error).__name__}: {error}"[:500]
                logger.warning("CUDA graph capture failed, decoding eagerly: %s", self.graph_error)
        if self.cuda_graphs:
            slot_cache.graphs[window].replay()
        else:
            self._advance(slot_cache, window, stop)
        self.stats["steps"] += 1

    def _capture(self, slot_cache: SlotCache, window: int, stop: torch.Tensor) -> None:
        """Capture the window's step. CUDA graphs need a warm-up run first (on a side stream); it advances
        the counters, which are put back, and writes what the first replay writes again."""
        saved = [tensor.clone() for tensor in slot_cache.counters()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._advance(slot_cache, window, stop)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for tensor, value in zip(slot_cache.counters(), saved, strict=True):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=slot_cache.graph_pool):
            self._advance(slot_cache, window, stop)
        slot_cache.graphs[window] = graph
        self.stats["graphs"] += 1

    @torch.inference_mode()
    def run(self, requests: list[DecodeRequest], prefill: Prefill, stop_token_ids: list[int]) -> list[Decoded]:
        """Decode every request; prompts are admitted in order as slots free up."""
        if not requests:
            return []
        slot_cache = self._slot_cache(requests)
        results = [Decoded() for _ in requests]
        started = [0.0] * len(requests)
        waiting = deque(range(len(requests)))
        running: dict[int, int] = {}  # slot -> request
        free = list(range(slot_cache.slots))
        column = max(r.prompt_length for r in requests)  # every prompt fits left of the first write column
        slot_cache.live.zero_()
        stop_set = set(stop_token_ids)
        stop: torch.Tensor | None = None
        # While an answer under a grammar runs or waits, the host reads every step's tokens, to give each
        # matcher its token and fill the next step's mask; other answers leave the mask open.
        constrained = {row for row, request in enumerate(requests) if request.matcher is not None}
        masked = False  # whether slot_cache.bitmask holds any grammar's mask
        masks: torch.Tensor | None = None  # host side of slot_cache.bitmask

        def fill_masks(bitmask: torch.Tensor, rows: dict[int, int]) -> torch.Tensor:
            """Row i of ``bitmask``: what request ``rows[i]``'s grammar allows next (all where it has none)."""
            bitmask.fill_(-1)
            for index, row in rows.items():
                matcher = requests[row].matcher
                if matcher is not None and not matcher.is_terminated():
                    matcher.fill_next_token_bitmask(bitmask, index)
            return bitmask

        def record(slot: int, tokens: list[int], probabilities: list[float]) -> None:
            """Append a row's new tokens up to its stop token or length cap; free its slot if it ended."""
            row = running[slot]
            result = results[row]
            matcher = requests[row].matcher
            for token, probability in zip(tokens, probabilities, strict=True):
                result.tokens.append(token)
                result.probabilities.append(probability)
                if matcher is not None and not matcher.is_terminated():
                    matcher.accept_token(token)
                if token in stop_set or len(result.tokens) >= requests[row].max_new_tokens:
                    result.milliseconds = (time.perf_counter() - started[row]) * 1000
                    del running[slot]
                    free.append(slot)
                    return

        def admit() -> None:
            """Fill free slots from the waiting prompts, in prefill groups of at most PREFILL_TOKENS."""
            nonlocal stop, masks
            while free and waiting:
                group: list[int] = []
                while waiting and len(group) < len(free):
                    width = max(requests[i].prompt_length for i in [*group, waiting[0]])
                    if group and width * (len(group) + 1) > PREFILL_TOKENS:
                        break
                    group.append(waiting.popleft())
                now = time.perf_counter()
                for row in group:
                    started[row] = now
                prefilled = prefill(group)
                self.stats["prefills"] += 1
                vocab_size = prefilled.logits.shape[-1]
                if stop is None:
                    stop = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
                    stop[stop_token_ids] = True
                    if slot_cache.bitmask is None:  # once per slot cache: its captured steps read this tensor
                        slot_cache.bitmask = full_bitmask(slot_cache.slots, vocab_size, self.device)
                    slot_cache.bitmask.fill_(-1)
                    masks = full_bitmask(slot_cache.slots, vocab_size)
                min_new = [requests[row].min_new_tokens for row in group]
                early = torch.tensor([count > 0 for count in min_new], device=self.device)
                group_masks = fill_masks(full_bitmask(len(group), vocab_size), dict(enumerate(group))).to(self.device)
                first = choose(prefilled.logits.to(self.device), stop, early, group_masks)
                slots = [free.pop(0) for _ in group]
                slot_cache.admit(slots, prefilled, column, first, min_new)
                for slot, row, token, probability in zip(
                    slots, group, first.tokens.tolist(), first.probabilities.tolist(), strict=True
                ):
                    running[slot] = row
                    record(slot, [token], [probability])

        admit()
        while running:
            assert stop is not None  # set by the first admission
            remaining = max(requests[row].max_new_tokens - len(results[row].tokens) for row in running.values())
            grammars = bool(constrained) and any(row in constrained for row in [*running.values(), *waiting])
            steps = min(1 if grammars else self.sync_steps, remaining)
            if column + steps > slot_cache.columns:
                column = self._move_back(slot_cache, column, running, waiting, requests)
                self.stats["moves"] += 1
            slot_cache.position.fill_(column)
            slot_cache.step_index.zero_()
            window = min(-(-(column + steps) // WINDOW_STEP) * WINDOW_STEP, slot_cache.columns)
            assert masks is not None and slot_cache.bitmask is not None
            if grammars:
                slot_cache.bitmask.copy_(fill_masks(masks, running))
            elif masked:
                slot_cache.bitmask.fill_(-1)
            masked = grammars
            for _ in range(steps):
                self._queue_step(slot_cache, window, stop)
            column += steps
            tokens = slot_cache.tokens[:steps].T.tolist()  # one read of the queued steps
            probabilities = slot_cache.probabilities[:steps].T.tolist()
            for slot in sorted(running):
                record(slot, tokens[slot], probabilities[slot])
            if free and waiting and (not running or len(free) * 4 >= slot_cache.slots):
                admit()
        return results

    @staticmethod
    def _move_back(
        slot_cache: SlotCache,
        column: int,
        running: dict[int, int],
        waiting: deque[int],
        requests: list[DecodeRequest],
    ) -> int:
        """Move the live columns back to the start of the buffer; the new write column, still right of
        every waiting prompt's length."""
        live = slot_cache.live[sorted(running)].any(0).nonzero()
        start = int(live[0]) if len(live) else column
        if waiting:
            start = min(start, column - max(requests[i].prompt_length for i in waiting))
        if start <= 0:
            raise RuntimeError("slot cache full: an answer is longer than the cache was sized for")
        slot_cache.shift(start, column)
        return column - start
