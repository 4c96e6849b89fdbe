"""The engine: a loaded model, its tokenizer, the page pool and the batched step."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from symphony.engine import cpu_kernels
from symphony.engine.attention import PAGE_SIZE, choose_attention, make_attention
from symphony.engine.batch import SeqChunk, build_step_input
from symphony.engine.config import EngineConfig
from symphony.engine.cuda_graphs import DecodeGraphs
from symphony.engine.default_model import default_model_path
from symphony.engine.model import LlamaModel
from symphony.engine.model_files import ModelFiles, load_model_files
from symphony.engine.page_pool import PagePool
from symphony.engine.quant import input_absmax, quantize_linears, restore_linears
from symphony.engine.quant_check import CHECK_TEXT, CHECK_TOKENS, QuantCheck, compare_logits
from symphony.engine.rope import rotate_cached_keys
from symphony.engine.sampling import SamplingParams, sample
from symphony.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Text the w8a8 layers calibrate their input ranges on: prose, a chat turn, code, digits.
CALIBRATION_TEXT = """<|im_start|>system
You are a helpful AI assistant.<|im_end|>
<|im_start|>user
Summarise the history of Paris in three sentences, then write a Python function.<|im_end|>
<|im_start|>assistant
Paris began as a settlement of the Parisii, a Celtic people, around 250 BC. The Romans
founded Lutetia there in 52 BC, and by the twelfth century it was one of Europe's largest
cities, growing into the capital of France. In 1889 the Eiffel Tower, 330 metres tall, was
built for the World's Fair.

def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
<|im_end|>"""


class Engine:
    """One model on one device. `step` computes chunks of many sequences at once.

    Not thread-safe: one caller (the scheduler's engine thread) drives it.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | ModelFiles | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        if isinstance(model, ModelFiles):
            files = model
        else:
            files = load_model_files(Path(model) if model is not None else default_model_path())
        self.model_config = files.config
        self.fingerprint = files.fingerprint
        info = files.tokenizer
        self.tokenizer = Tokenizer(
            info.tokenizer_json, info.chat_template, info.bos_token_id, info.eos_token_id
        )
        mc, ec = self.model_config, self.config
        # the compiled CPU kernels run fp32 on a CPU; None elsewhere, or where they
        # cannot run here (torch's ops then)
        self._on_cpu_fp32 = ec.device.startswith("cpu") and ec.torch_dtype == torch.float32
        self.kernels = cpu_kernels.load() if self._on_cpu_fp32 else None
        # the backend first: it sets the page size (flash-attn's pages hold 256 tokens)
        backend, self.page_size = choose_attention(ec.attention, ec.device, ec.page_size)
        # num_pages counts pages of 16 tokens when the backend chose the size: the same
        # tokens of KV (and memory) whichever page size it chose
        num_pages = ec.num_pages
        if not ec.page_size and self.page_size != PAGE_SIZE:
            num_pages = max(2, ec.num_pages * PAGE_SIZE // self.page_size)
        self.model = LlamaModel(mc, files.weights, ec.torch_dtype, ec.device, self.kernels)
        self.pool = PagePool(
            mc.num_layers,
            num_pages,
            self.page_size,
            mc.num_kv_heads,
            mc.head_dim,
            ec.torch_kv_dtype,
            ec.device,
        )
        self.attention = make_attention(
            backend, mc.num_heads, mc.num_kv_heads, mc.head_dim, self.page_size, self.kernels
        )
        self.graphs: DecodeGraphs | None = None  # --cuda-graphs: decode steps replayed
        self.quant = "fp32"  # what runs: "fp32", "int8" or "w8a8"
        self.quant_check: QuantCheck | None = None  # auto's figures, where it ran
        if ec.quant == "auto":
            self._auto_quant()
        elif ec.quant != "fp32":
            self._quantize(ec.quant)
        if ec.cuda_graphs:  # recorded from the final (quantized or not) layers
            self.graphs = DecodeGraphs(self.model, self.pool, self.attention, mc.max_position)
        log.info(
            "engine: %s on %s (%s, KV %s, quant %s, attention %s), %d pages of %d tokens",
            mc.name,
            ec.device,
            ec.torch_dtype,
            ec.torch_kv_dtype,
            self.quant,
            self.attention.name,
            num_pages,
            self.page_size,
        )

    def _quantize(self, mode: str) -> None:
        """Swap the linear layers for `mode` ones ("w8a8" calibrates on a built-in text)."""
        absmax = None
        if mode == "w8a8":
            ids = self.tokenizer.encode(CALIBRATION_TEXT)[: self.model_config.max_position]
            with self.model.layers_as_modules():  # the calibration's hooks must fire
                absmax = input_absmax(self.model, lambda: self.prompt_logits(ids))
        quantize_linears(self.model, mode, absmax, self.kernels)
        self.quant = mode

    def _auto_quant(self) -> None:
        """int8 if the kernels run here and the int8 model passes its check, else fp32."""
        if not self._on_cpu_fp32:
            return
        if self.kernels is None:
            log.warning("quant auto: fp32 (the int8 kernels do not run here)")
            return
        # at most CHECK_TOKENS, and no more than the pool holds: a small pool checks less
        room = min(self.model_config.max_position, self.pool.num_free * self.page_size)
        ids = self.tokenizer.encode(CHECK_TEXT)[: min(CHECK_TOKENS, room)]
        reference = self.prompt_logits(ids)
        originals = quantize_linears(self.model, "int8", kernels=self.kernels)
        self.quant_check = compare_logits(reference, self.prompt_logits(ids))
        if self.quant_check.passed:
            self.quant = "int8"
            log.info("quant auto: int8 (%s)", self.quant_check.describe())
        else:
            restore_linears(self.model, originals)
            log.warning("quant auto: fp32, int8 strays too far (%s)", self.quant_check.describe())

    def prompt_logits(self, ids: Sequence[int], chunk: int = 512) -> torch.Tensor:
        """Logits [len(ids), vocab] of every position of `ids` as one sequence, computed
        `chunk` tokens a step (a long prompt in one step pays a quadratic mask); the
        pages are freed after.
        """
        pages = self.pool.allocate(self.pages_for(len(ids)))
        try:
            return torch.cat(
                [
                    self.step([SeqChunk(part, i, pages, num_logits=len(part))])
                    for i in range(0, len(ids), chunk)
                    if (part := ids[i : i + chunk])
                ]
            )
        finally:
            self.pool.decref(pages)

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def step(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Compute every chunk's tokens, writing their K/V into the chunk's pages.

        Returns:
            logits [sum of len(chunk.returned_rows), vocab] in fp32: each chunk's rows
            (its `logit_rows`, else its last `num_logits`) in order, chunk by chunk.

        Raises:
            ValueError: a chunk is malformed (see `build_step_input`), runs past the
                model's maximum context, or has a position outside 0..max_position-1.
        """
        limit = self.model_config.max_position
        longest = max((c.context_len for c in chunks), default=0)
        if longest > limit:
            raise ValueError(f"context of {longest} tokens exceeds the model's {limit}")
        for c in chunks:
            # checked here, not left to the rope table's indexing: on CUDA an index
            # out of range is a device assert that ends the process, not an exception
            if not c.positions:
                continue
            low, high = min(c.positions), max(c.positions)
            if low < 0 or high >= limit:
                raise ValueError(f"positions {low}..{high} are not all within 0..{limit - 1}")
        try:
            if self.graphs is not None and self.graphs.fits(chunks):
                return self.graphs.run(chunks)
            step = build_step_input(chunks, self.page_size, self.config.device)
            plan = self.attention.prepare(step.attn)
            return self.model(
                step.token_ids,
                step.positions,
                step.attn.slot_mapping,
                step.logits_indices,
                self.pool,
                self.attention,
                plan,
            )
        finally:  # on a GPU, reads of these pages wait for this step (a CPU skips it)
            ps = self.page_size
            self.pool.mark_written(
                page
                for c in chunks
                for page in c.block_table[c.start_pos // ps : -(-c.context_len // ps)]
            )

    def rotate_keys(self, slots: Sequence[int], shifts: Sequence[int]) -> None:
        """Move the cached keys in flat `slots` of the pool from their position p to
        p + shifts[i] (RoPE rotates them there), in every layer; values stay as they are.

        Raises:
            ValueError: a shift past the model's positions.
        """
        rotate_cached_keys(self.pool, slots, shifts, self.model.rope_cos, self.model.rope_sin)
        self.pool.mark_written(slot // self.page_size for slot in slots)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> list[int | None]:
        """One token per row; None where the row's logits are not finite."""
        return sample(logits, params, generators)
