"""DTYPE=int8 on a CPU: the decoder's projections in int8 (what runs around them: dtype_tier.to_int8).

Each nn.Linear of the decoder layers (attention and MLP projections; not the vision encoder, the
embeddings, the final norm or a reranker's head) is replaced, once the float32 weights are loaded,
by `RowInt8Linear`: its weights quantized per output channel (symmetric int8), its input
quantized per row at each call, and the product summed in int32 by one of two kernels:

- where the CPU has VNNI and `torch._int_mm` (oneDNN: int8 x int8 into int32) sums full-scale
  products exactly (`int_mm`, checked once): each row is scaled by its own largest magnitude and
  rounded to signed 8 bits, the product's rows and columns scaled back;
- elsewhere torch's fbgemm kernel (`quantized::linear_dynamic`) with 7-bit activations
  (`reduce_range`: without VNNI its pairwise int16 sums saturate on full-range inputs). fbgemm
  takes one range per call, so each row is first divided by its largest magnitude and one guard
  row of +1 and -1 is appended: the kernel's range is always [-1, 1].

Per row, not per call: torch's own dynamic quantization (`quantize_dynamic`) takes one range for the
whole input of a call, so one row's vector would depend on the other rows of its batch (and on a
packed batch's longest row). Outliers: trained models carry a few input channels far larger than
the rest, and in one int8 range with them every other value of the row would lose its precision; a
value more than OUTLIER times its row's mean magnitude is left out of the int8 product and
multiplied in float32 (on the same int8 weights), in the columns where any row has one (at most
1/16 of them, the farthest out). A row's own values decide its range and which of its values are
outliers, so the rest of its batch does not change its result (unless more columns than that have
outliers). The MLP's down projection is the exception: its input, silu(gate) * up, is heavy-tailed
in every column, so its rows are quantized whole. docs/benchmarks.md gives the speed and the cosine
to float32 on the test checkpoints, per kernel, with and without simulated outliers.
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch

# An input value more than OUTLIER times its row's mean magnitude is an outlier: it is left out of the
# int8 product and multiplied in float32 instead. For a Gaussian row that is beyond 6 standard
# deviations (about one value in five billion); trained models put a few channels far beyond that.
OUTLIER = 8.0
# At most this share of a layer's input columns is taken in float32 (those farthest out); past it the
# batch decides which, and a row's result then depends a little on its batch. Trained models'
# outlier channels are reported to be a handful per layer.
OUTLIER_COLUMNS = 1 / 16
# The MLP's down projection takes silu(gate) * up, a product whose values are heavy-tailed in every
# column (on the test checkpoints' shapes, past 8x the mean magnitude in nearly all of them in any
# batch): its rows are quantized whole, without outliers in float32.
PLAIN = ("down_proj",)
# Each thread's int8 layers reuse three scratch buffers for their temporaries (the input's magnitudes
# and scaled values, its int8 codes, the int32 sums), grown to the largest call seen up to this many
# bytes each; a larger call allocates its own. Fresh multi-megabyte temporaries at every call cost
# page faults under glibc's malloc (a freed heap top is given back to the kernel): 0.95x bfloat16's
# speed through the server against 1.33x with tcmalloc, on the 512-wide text checkpoint.
SCRATCH_BYTES = 64 << 20


class RowInt8Linear(torch.nn.Module):
    """A linear layer in int8: weights per output channel, activations per row (see the module), the
    outlier values of each row in float32. `kernel`: "int_mm" or "fbgemm"; by default what `int_mm()`
    says this CPU runs exactly."""

    def __init__(self, linear: torch.nn.Linear, outliers: bool = True, kernel: str | None = None):
        super().__init__()
        self.outliers = outliers
        self.kernel = kernel or ("int_mm" if int_mm() else "fbgemm")
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(1) / 127).clamp_min(1e-12)
        self.weight_scale = scale
        # (in, out): what torch._int_mm multiplies by; the outliers' product reads its rows. fbgemm
        # keeps its own packed copy, so a fbgemm layer without outliers needs none.
        self.weight_int8 = None
        if self.kernel == "int_mm" or outliers:
            self.weight_int8 = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8).T.contiguous()
        if self.kernel == "fbgemm":
            zero = torch.zeros(weight.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch marks its quantized tensors deprecated (moving to torchao)
                warnings.simplefilter("ignore")
                quantized = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        m = rows.shape[0]
        size = _scratch("magnitudes", (m, self.in_features), torch.float32)
        torch.abs(rows, out=size)
        peak = size.amax(-1, keepdim=True)
        outliers = None
        if self.outliers:
            limit = size.mean(-1, keepdim=True).mul_(OUTLIER)
            if bool((peak > limit).any()):
                peak, outliers = self._outliers(rows, size, limit)
        if self.kernel == "int_mm":
            scale = peak.clamp_min_(1e-30).div_(127)
            scaled = torch.div(rows, scale, out=size)  # the magnitudes are done with
            if outliers is not None:  # their places hold what stays in int8
                scaled.index_copy_(1, outliers[1], outliers[2] / scale)
            codes = _scratch("codes", (m, self.in_features), torch.int8)
            codes.copy_(scaled.round_())
            sums = torch._int_mm(codes, self.weight_int8, out=_scratch("sums", (m, self.out_features), torch.int32))
            out = sums.float().mul_(self.weight_scale).mul_(scale)
        else:
            scale = peak.clamp_min_(1e-30)
            scaled = rows.new_empty(m + 1, self.in_features)
            torch.div(rows, scale, out=scaled[:-1])
            if outliers is not None:
                scaled[:-1].index_copy_(1, outliers[1], outliers[2] / scale)
            scaled[-1].zero_()
            scaled[-1, 0], scaled[-1, 1] = 1.0, -1.0  # the guard row: the kernel's range is [-1, 1]
            out = torch.ops.quantized.linear_dynamic(scaled, self.packed, True)[:-1]
            out.mul_(scale)
        if outliers is not None:  # the outliers, on the same int8 weights, in float32
            values, columns, _ = outliers
            out.addmm_(values, self.weight_int8[columns].float().mul_(self.weight_scale))
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _outliers(self, rows, size, limit):
        """The columns with outliers (at most OUTLIER_COLUMNS of them, the farthest out), their far
        values (to be multiplied in float32) and what stays of them in int8; and each row's peak
        without its outliers, exactly its largest magnitude left (fbgemm takes its range from the
        whole input: a peak off by a rounding would move every row's). `size` (the magnitudes) is
        cleared in those columns on the way."""
        reach = (size / limit).amax(0)  # per column, its largest value against its row's limit
        cap = max(1, int(self.in_features * OUTLIER_COLUMNS))
        columns = (reach > 1).nonzero().squeeze(1)
        if len(columns) > cap:
            columns = reach.topk(cap).indices
        part = rows[:, columns]
        far = size[:, columns] > limit
        kept = part.masked_fill(far, 0.0)  # what stays in int8, in those columns
        rest = size.index_fill_(1, columns, 0.0).amax(-1, keepdim=True)
        peak = torch.maximum(rest, kept.abs().amax(-1, keepdim=True))
        return peak, (part * far, columns, kept)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel x per row "
                f"({self.kernel})" + (", outliers in float32" if self.outliers else ""))


_local = threading.local()


def _scratch(name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) tensor of `dtype` on this thread's buffer `name` (see SCRATCH_BYTES); its
    contents are whatever the last call left."""
    count = shape[0] * shape[1]
    if count * dtype.itemsize > SCRATCH_BYTES:
        return torch.empty(shape, dtype=dtype)
    buffer = getattr(_local, name, None)
    if buffer is None or buffer.numel() < count:
        with torch.inference_mode(False):  # a normal tensor: written to in and out of inference mode
            buffer = torch.empty(count, dtype=dtype)
        setattr(_local, name, buffer)
    return buffer[:count].view(shape)


@functools.cache
def int_mm() -> bool:
    """Whether this CPU runs the int8 products through torch._int_mm: it has VNNI (int8 products
    summed straight into int32) and the kernel sums the worst case exactly, every product at full
    scale (127 x 127, and 127 x -127). Without VNNI, x86 kernels sum pairs of products in int16 first,
    which saturates there; fbgemm's 7-bit activations are the safe choice then."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    try:
        if vnni is None or not vnni():
            return False
        codes = torch.full((2, 64), 127, dtype=torch.int8)
        codes[1] = -127
        weights = codes.T.contiguous()
        return bool(torch.equal(torch._int_mm(codes, weights).long(), codes.long() @ weights.long()))
    except Exception:  # noqa: BLE001 - no such kernel here: fbgemm
        return False


def quantizable(name: str) -> bool:
    """Whether the nn.Linear at `name` (a qualified module name) runs in int8: the decoder layers' own."""
    return ".layers." in f".{name}" and "visual" not in name


def projections(module: torch.nn.Module, prefix: str = ""):
    """(parent, attribute, linear) of each decoder-layer nn.Linear under `module` (`prefix`: its own
    qualified name, e.g. "layers.0" for one decoder layer), found as it goes: a caller that replaces
    each one holds no reference to those it has done (runners/prepack.py frees them one by one)."""
    for name, parent in module.named_modules(prefix=prefix):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and quantizable(f"{name}.{child_name}" if name else child_name):
                yield parent, child_name, child


def quantize(model: torch.nn.Module, kernel: str | None = None) -> int:
    """Replace the decoder layers' nn.Linear modules of `model` (float32, on a CPU) in place; returns
    how many. `kernel`: as RowInt8Linear's. Raises RuntimeError where this torch has no int8 CPU kernel."""
    done = 0
    for parent, name, linear in projections(model):
        setattr(parent, name, RowInt8Linear(linear, outliers=name not in PLAIN, kernel=kernel))
        done += 1
    return done


def supported() -> str | None:
    """Why DTYPE=int8 cannot run in this torch, or None: one small int8 linear is built and run
    (torch marks its quantized tensors deprecated; a torch without them is said at start-up)."""
    try:
        layer = RowInt8Linear(torch.nn.Linear(4, 3))
        out = layer(torch.ones(2, 4))
        if out.shape != (2, 3) or not torch.isfinite(out).all():
            return f"its int8 linear kernel ({layer.kernel}) gave a wrong result"
    except Exception as exc:  # noqa: BLE001 - any failure means the kernel is not there
        return f"this torch has no int8 linear kernel ({exc.__class__.__name__}: {str(exc)[:200]})"
    return None
