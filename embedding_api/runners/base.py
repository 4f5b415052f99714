"""What every runner shares: tokenizer, collation of token ids, the forward pass, last-token pooling.

`prepare` is pure CPU work on one input and is safe to call from several
threads; `forward` is called by one thread only (the batcher's model worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..settings import Settings
from ..model_paths import weights_hint
from .loading import ModelLoadError, hidden_size
from .long_text import PrefixTokenizer
from . import dtype_tier, packed, prefix as prefix_reuse
from .compiled import CompileChoice
from .prepack import PrepackChoice
from .split import groups as length_groups, overhead_tokens

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


class InputTooLong(ValueError):
    """An input that cannot be cut to MAX_INPUT_TOKENS: its image tokens alone do not fit, or the
    request asked not to truncate."""


@dataclass
class PreparedInput:
    """One input, ready for the model: token ids plus, for images, patches."""

    input_ids: list[int]
    pixel_values: np.ndarray | None = None  # (patches, patch_dim), float32
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    video_pixel_values: np.ndarray | None = None  # (patches, patch_dim), float32
    video_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    truncated: bool = False  # cut at MAX_INPUT_TOKENS
    prefix: int = 0  # leading tokens shared by every input with this instruction (runners/prefix.py)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ModelInfo:
    family: str
    dimension: int
    takes_images: bool
    vocab_size: int
    device: str
    dtype: str
    default_query_instruction: str
    kind: str = "embedding"
    dtype_reason: str = ""  # why this dtype: "setting", "cuda", "probe", "no native bf16", "probe off"
    dtype_probe_ms: dict | None = None  # the start-up probe's median forward per dtype, when it ran
    prepacked: bool = False  # CPU_PREPACK: the decoder's projections in oneDNN's blocked layout
    prepack_reason: str = ""  # why or why not: "setting", "probe", "not a CPU", "packed forward off", ...
    compiled: bool = False  # TORCH_COMPILE: the packed forward's decoder layers compiled
    compile_reason: str = ""  # "compiled", "setting" (off), or why not: "int8", "compile failed (...)", ...


class Runner:
    """Shared by both families: tokenizer, truncation, batching of token ids, pooling."""

    family: str
    takes_images: bool
    default_query_instruction: str
    kind = "embedding"

    def __init__(self, settings: Settings, config: dict, device: torch.device, dtype: torch.dtype,
                 weights: bool = True):
        """`weights=False` builds everything but the model itself: a runner that prepares inputs for a
        model process (engine/model_process.py) that holds the weights and runs `forward`."""
        from transformers import AutoTokenizer

        self.settings = settings
        self.config = config
        self.device = device
        self.dtype = dtype
        choice = dtype_tier.initial_choice(settings.dtype, device)
        self.dtype_choice = choice if choice.dtype == dtype else dtype_tier.DtypeChoice(dtype, "setting")
        self.prepack_choice = PrepackChoice(False, "pending")  # CPU_PREPACK, once settled (runners/prepack.py)
        self.compile_choice = CompileChoice(False, "pending")  # TORCH_COMPILE, once settled (runners/compiled.py)
        self.compiled_layer = None  # the packed forward's layer step, compiled (runners/compiled.py)
        self.vision_encoder = None  # Qwen3-VL's vision encoder, compiled (runners/vision_encoder.py)
        self.max_tokens = settings.max_input_tokens
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        except Exception as exc:  # a broken tokenizer is a start-up error, not a crash later
            raise ModelLoadError(
                f"The tokenizer in {settings.model_path!r} could not be loaded ({exc.__class__.__name__}). "
                f"{weights_hint(settings.model_path)}"
            ) from None
        # The Rust tokenizer underneath: thread-safe for encoding, with no truncation state to share.
        self.backend = self.tokenizer.backend_tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        self.long_text = PrefixTokenizer(self.backend)  # long texts: the GIL released, only the start that matters
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.model = self._load_model() if weights else None
        # Keys and values of shared prompt prefixes, in the process that runs the forward passes.
        self.prefix_cache = prefix_reuse.PrefixCache(settings.prefix_cache_size) \
            if weights and settings.prefix_cache else None
        self._prefix_ids: dict = {}  # what `shared_prefix` compares against, per instruction
        self.packing = False  # text batches in one packed forward (runners/packed.py): set by `check_packing`
        self.packing_vision = False  # inputs with images or videos too (runners/packed_vision.py): the same
        self.split_overhead: float | None = None  # one more forward's cost in tokens (runners/split.py `settle`)
        # Where small tensors the runner keeps (e.g. a reranker's score rows) live: never a GPU in a
        # process without the model, so that it creates no CUDA context.
        self.home = device if weights else torch.device("cpu")
        self.process = None  # the model process running this runner's forward passes, if any
        self.dimension = hidden_size(config)
        self.vocab_size = int(config.get("text_config", config)["vocab_size"])

    def _load_model(self):
        raise NotImplementedError

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.family,
            dimension=self.dimension,
            takes_images=self.takes_images,
            vocab_size=self.vocab_size,
            device=str(self.device),
            dtype=self.dtype_choice.name,
            default_query_instruction=self.default_query_instruction,
            kind=self.kind,
            dtype_reason=self.dtype_choice.reason,
            dtype_probe_ms=dict(self.dtype_choice.times_ms) or None,
            prepacked=self.prepack_choice.on,
            prepack_reason=self.prepack_choice.reason,
            compiled=self.compile_choice.on,
            compile_reason=self.compile_choice.reason,
        )

    def reserved_strings(self) -> tuple[str, ...]:
        """What user text may not contain: the tokenizer's special tokens (the chat template's
        `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, the vision markers, ...). In a text or an
        instruction they would become those very tokens and reshape the prompt: a wrong vector,
        or vision placeholders without pixels that fail the forward pass."""
        special = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        return tuple(sorted(special | set(VISION_TOKENS)))

    def reserved_token_ids(self) -> frozenset[int]:
        ids = self.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        return frozenset(i for i in ids if i is not None and i != self.tokenizer.unk_token_id)

    def _collate_ids(self, batch: list[PreparedInput]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad token ids; returns ids, attention mask and the index of each last real token."""
        ids, mask, lengths = _padded(batch, self.pad_id, left=False)
        return ids, mask, lengths - 1

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.long_text.encode(text, special)

    def encode_head(self, text: str, limit: int) -> list[int]:
        """encode(text), or for a long text possibly only a TokenPrefix: more than `limit` tokens,
        the first `limit` of them exactly the text's (what truncation at `limit` keeps)."""
        return self.long_text.head(text, limit)

    def post_processor_tokens(self) -> tuple[list[int], list[int]]:
        """What the tokenizer's post-processor adds before and after a sequence (Qwen3-Embedding's
        appends <|endoftext|>; Qwen3-VL-Embedding's adds nothing)."""
        plain = self.encode("a")
        full = self.encode("a", special=True)
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        return full[:start], full[start + len(plain):]

    def fit(self, body: list[int], prefix: list[int], suffix: list[int], truncate: bool = True,
            cut: bool = False) -> list[int]:
        """prefix + body + suffix within MAX_INPUT_TOKENS: the end of the body is cut first and the
        post-processor's tokens are kept, as the tokenizer's own truncation does; with `truncate`
        false an input that does not fit is refused. `cut`: the body holds only the first tokens of
        the input (a TokenPrefix inside), more than fit."""
        room = self.max_tokens - len(prefix) - len(suffix)
        if len(body) > room and not truncate:
            count = "more tokens than" if cut else f"{len(prefix) + len(body) + len(suffix)} tokens, more than"
            raise InputTooLong(
                f"this input has {count} MAX_INPUT_TOKENS={self.max_tokens}, and the request sets \"truncate\": false"
            )
        return prefix + body[:room] + suffix

    _PREFIXES_KEPT = 64  # instructions whose prefix token ids are kept

    def shared_prefix(self, ids: list[int], key, make) -> int:
        """How many leading tokens of `ids` are the prefix every input with `key` (its instruction)
        starts with: `make()` gives that prefix's token ids, made once per key."""
        if not self.settings.prefix_cache:
            return 0
        candidate = self._prefix_ids.get(key)
        if candidate is None:
            candidate = make()
            if len(self._prefix_ids) >= self._PREFIXES_KEPT:
                self._prefix_ids.pop(next(iter(self._prefix_ids)), None)
            self._prefix_ids[key] = candidate
        return prefix_reuse.shared_length(ids, candidate)

    def prefix_cache_entries(self) -> int:
        """Prefixes whose keys and values this model copy holds (as its model process last said)."""
        if self.process is not None:
            return getattr(self.process, "prefix_cache_entries", 0)
        return len(self.prefix_cache) if self.prefix_cache is not None else 0

    def _pool(self, hidden: torch.Tensor, last: torch.Tensor) -> np.ndarray:
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
        return rows.float().cpu().numpy()

    def prepare(self, texts: list[str], images: list[Image.Image], token_ids: list[int] | None,
                instruction: str | None, truncate: bool = True, videos: list = ()) -> PreparedInput:
        raise NotImplementedError

    def _vision_inputs(self, batch: list[PreparedInput], ids: torch.Tensor) -> dict[str, Any]:
        return {}

    def serve_from(self, process) -> None:
        """Run this runner's forward passes in `process`, a model process that holds the weights."""
        self.process = process
        self.forward = process.forward  # shadows the class's forward, for every family and kind

    @torch.inference_mode()
    def forward(self, batch: list[PreparedInput]) -> np.ndarray:
        """The batch through the model; returns the pooled (not yet normalised) rows in float32, in order.

        On a CPU, the texts of a batch run packed, without padding (runners/packed.py), where this
        model copy's start-up check allowed it (a text alone too: its layers written out cost less
        than the model's modules); the other inputs (images, videos), if of very
        different lengths, run as a few forwards of similar lengths (runners/split.py), where the
        padding they save costs more than the extra forwards."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this worker thread's device, for anything placed implicitly
        if self.device.type != "cpu":
            return self._forward_padded(batch)
        rest = list(range(len(batch)))
        reuse = self.prefix_cache is not None
        own = [p.n_tokens - (p.prefix if reuse else 0) for p in batch]  # the tokens each input computes
        parts: list[tuple[list[int], Any]] = []
        if self.packing:
            takes = [i for i in rest if packed.takes(self, batch[i])]
            if takes:
                for rows in packed.forwards([own[i] for i in takes]):
                    parts.append(([takes[j] for j in rows], lambda rows: packed.run(self, rows)))
                rest = [i for i in rest if not packed.takes(self, batch[i])]
        if rest:
            overhead = self.split_overhead or overhead_tokens(self.config, self.dtype)
            for group in length_groups([own[i] for i in rest], overhead):
                parts.append(([rest[j] for j in group], self._forward_padded))
        if len(parts) == 1 and len(parts[0][0]) == len(batch):
            return parts[0][1](batch)  # one forward of the batch as it came
        out = None
        for rows, run in parts:
            pooled = run([batch[i] for i in rows])
            if out is None:
                out = np.empty((len(batch),) + pooled.shape[1:], dtype=pooled.dtype)
            out[rows] = pooled
        return out

    def probe_inputs(self, texts, images=()) -> list[PreparedInput]:
        """Inputs for start-up checks and probes (runners/packed.py, split.py): each text, then each
        image, alone, without instruction."""
        return [self.prepare([text], [], None, None) for text in texts] + \
            [self.prepare([], [image], None, None) for image in images]

    def check_packing(self) -> bool:
        """Turn the packed forward on where it gives this model copy's padded vectors (on a CPU), for
        inputs with images or videos too where they do; called once the weights are loaded."""
        self.packing = packed.check(self)
        self.packing_vision = self.packing and packed.check_vision(self)
        return self.packing

    def _forward_padded(self, batch: list[PreparedInput]) -> np.ndarray:
        """One right-padded forward of the whole batch."""
        if self.prefix_cache is not None and any(p.prefix for p in batch):
            return self._pool(*prefix_reuse.run(self, batch))
        ids, mask, last = self._collate_ids(batch)
        out = self.model(
            input_ids=ids.to(self.device, non_blocking=True),
            attention_mask=mask.to(self.device, non_blocking=True),
            use_cache=False,
            **self._vision_inputs(batch, ids),
        )
        return self._pool(out.last_hidden_state, last)




def _padded(batch: list[PreparedInput], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids padded to the longest (on the right, or on the left), the attention mask and the
    lengths, built in numpy: one tensor op per batch rather than three per row."""
    lengths = np.fromiter((p.n_tokens for p in batch), dtype=np.int64, count=len(batch))
    width = int(lengths.max())
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    for row, p in enumerate(batch):
        if left:
            ids[row, width - len(p.input_ids):] = p.input_ids
        else:
            ids[row, : len(p.input_ids)] = p.input_ids
    columns = np.arange(width)
    mask = columns >= (width - lengths)[:, None] if left else columns < lengths[:, None]
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(lengths)
