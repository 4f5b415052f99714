"""DTYPE=int8 on a CPU: the decoder's projections in int8, everything else as in float32.

Each nn.Linear of the decoder layers (attention and MLP projections; not the vision encoder, the
embeddings, the final norm or a reranker's head) is replaced, once the float32 weights are loaded,
by `RowInt8Linear`: its weights quantized per output channel (symmetric int8), its input
quantized per row at each call, and the product computed by torch's own int8 kernel (fbgemm's
dynamic linear, int32 accumulation). Per row, not per call: torch's own dynamic quantization
(`quantize_dynamic`) takes one range for the whole input of a call, so one row's vector would
depend on the other rows of its batch (and on a packed batch's longest row). Here each row is first
divided by its largest magnitude and one guard row of +1 and -1 is appended, so the kernel's range
is always [-1, 1] and a row is quantized the same whatever else is in its batch; the output rows
are multiplied back. Outliers: trained models carry a few input channels far larger than the rest,
and in one int8 range with them every other value of the row would lose its precision; a value
more than OUTLIER times its row's mean magnitude is left out of the int8 product and multiplied in
float32 (on the same int8 weights), in the columns where any row has one (at most 1/16 of them,
the farthest out). A row's own values decide its range and which of its values are outliers, so
the rest of its batch does not change its result (unless more columns than that have outliers). The
MLP's down projection is the exception: its input, silu(gate) * up, is heavy-tailed in every column,
so its rows are quantized whole. fbgemm takes 7-bit activations on x86 (`reduce_range`), which bounds
the fidelity: docs/benchmarks.md gives the speed and the cosine to float32 on the test checkpoints,
with and without simulated outliers.
"""

from __future__ import annotations

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


class RowInt8Linear(torch.nn.Module):
    """A linear layer in int8: weights per output channel, activations per row (see the module), the
    outlier values of each row in float32."""

    def __init__(self, linear: torch.nn.Linear, outliers: bool = True):
        super().__init__()
        self.outliers = outliers
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(1) / 127).clamp_min(1e-12)
        if outliers:  # the outliers' product reads these columns of the int8 weights
            self.weight_int8 = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.weight_scale = scale
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
        size = rows.abs()
        peak = size.amax(-1, keepdim=True)
        limit = size.mean(-1, keepdim=True).mul_(OUTLIER) if self.outliers else peak
        outliers = None
        if self.outliers and bool((peak > limit).any()):  # outliers: the columns they are in, then the values
            reach = (size / limit).amax(0)  # per column, its largest value against its row's limit
            cap = max(1, int(self.in_features * OUTLIER_COLUMNS))
            columns = (reach > 1).nonzero().squeeze(1)
            if len(columns) > cap:
                columns = reach.topk(cap).indices
            part = rows[:, columns]
            far = size[:, columns] > limit
            outliers = (part * far, columns)
            part = part.masked_fill(far, 0.0)  # what stays in int8, in those columns
            peak = torch.maximum(size.index_fill(1, columns, 0.0).amax(-1, keepdim=True),
                                 part.abs().amax(-1, keepdim=True))
        scale = peak.clamp_min_(1e-30)
        scaled = rows.new_empty(rows.shape[0] + 1, self.in_features)
        torch.div(rows, scale, out=scaled[:-1])
        if outliers is not None:
            scaled[:-1].index_copy_(1, outliers[1], part / scale)
        scaled[-1].zero_()
        scaled[-1, 0], scaled[-1, 1] = 1.0, -1.0  # the guard row: the kernel's range is [-1, 1]
        out = torch.ops.quantized.linear_dynamic(scaled, self.packed, True)[:-1]
        out.mul_(scale)
        if outliers is not None:  # the outliers, on the same int8 weights, in float32
            values, columns = outliers
            out.addmm_(values, self.weight_int8[:, columns].float().mul_(self.weight_scale[:, None]).T)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel x per row"
                + (", outliers in float32" if self.outliers else ""))


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


def quantize(model: torch.nn.Module) -> int:
    """Replace the decoder layers' nn.Linear modules of `model` (float32, on a CPU) in place; returns
    how many. Raises RuntimeError where this torch has no int8 CPU kernel."""
    done = 0
    for parent, name, linear in projections(model):
        setattr(parent, name, RowInt8Linear(linear, outliers=name not in PLAIN))
        done += 1
    return done


def supported() -> str | None:
    """Why DTYPE=int8 cannot run in this torch, or None: one small int8 linear is built and run
    (torch marks its quantized tensors deprecated; a torch without them is said at start-up)."""
    try:
        layer = RowInt8Linear(torch.nn.Linear(4, 3))
        out = layer(torch.ones(2, 4))
        if out.shape != (2, 3) or not torch.isfinite(out).all():
            return "its int8 linear kernel gave a wrong result"
    except Exception as exc:  # noqa: BLE001 - any failure means the kernel is not there
        return f"this torch has no int8 linear kernel ({exc.__class__.__name__}: {str(exc)[:200]})"
    return None
