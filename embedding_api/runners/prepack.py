"""CPU_PREPACK: the decoder's projection weights in oneDNN's blocked layout, made once at start-up.

A CPU matmul (`F.linear`) on plain row-major weights goes to the BLAS (MKL in torch's CPU wheels)
or, in bfloat16, to oneDNN, which first copies the weights into the blocked layout its kernels
read, on every call. Made once, that layout saves the copy, and in float32 it moves the work from
MKL to oneDNN's kernels, which on some CPUs run closer to their peak (on an AMD EPYC with AVX-512:
1.09-1.32x MKL on the projections' shapes, the decoder's forward 1.08-1.16x; with both libraries
held to AVX2 there, 1.05x; on an AVX2 host measured earlier oneDNN's unpacked linear was slower than
MKL), while on narrow layers (64 wide) the forward is slower (0.9x). Hence a choice per host and
model, by measurement:

- `auto` (default): on a CPU copy whose packed forward is on (runners/packed.py), in float32 or
  bfloat16, a start-up probe times the first decoder layer on the probe batch of DTYPE=auto's probe,
  with its projections plain and prepacked, in turns; the prepacked weights are kept when their
  median takes at most PREPACK_MARGIN of the plain one's, and then every decoder layer's
  projections are prepacked (each layer in turn: the plain weights are freed as it goes).
- `true`: prepacked with no probe (a CPU copy in float32 or bfloat16); `false`: plain weights.

Only the decoder layers' nn.Linear modules (attention and MLP projections; as DTYPE=int8 takes
them): not the vision encoder, the embeddings or a reranker's head. Vectors move by float32
rounding only (different summing order; cosine 1.000000 to the plain weights). float16 is not
prepacked (oneDNN's float16 kernels need AVX512-FP16 or AVX-NE-CONVERT), nor DTYPE=int8's layers.
TORCH_COMPILE (runners/compiled.py) compiles the layers around the prepacked matmuls.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import packed
from .dtype_tier import measure, probe_batch
from .int8 import projections

log = logging.getLogger("embedding_api")

PREPACK_MARGIN = 0.95  # prepacked weights are kept when the probe's median takes at most this share
DTYPES = (torch.float32, torch.bfloat16)


class PrepackedLinear(torch.nn.Module):
    """An nn.Linear whose weight lies in oneDNN's blocked layout (an opaque tensor, not a parameter:
    `state_dict` and `.to()` do not see it); `weight` gives the plain one back."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def plain(self) -> torch.nn.Linear:
        """The nn.Linear this was made from (its weights copied back out of the blocked layout)."""
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                 dtype=self.packed.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def __deepcopy__(self, memo):  # an opaque tensor has no storage to copy: rebuilt from the plain one
        return PrepackedLinear(self.plain())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked (oneDNN)"


@torch.library.custom_op("embedding_api::prepacked_linear", mutates_args=(),
                         schema="(Tensor x, Tensor packed, Tensor? bias) -> Tensor")
def _prepacked_linear(x, packed, bias):
    """A projection on prepacked weights (PrepackedLinear.packed), to inductor an opaque call: the
    oneDNN matmul itself, the steps around it compiled (compiled.py, vision_encoder.py)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_prepacked_linear.register_fake
def _(x, packed, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def linear(x, weight, bias, prepacked: bool):
    """A projection in a compiled function, on the weight `linear_weights` gave."""
    return _prepacked_linear(x, weight, bias) if prepacked else F.linear(x, weight, bias)


def linear_weights(module) -> tuple:
    """A projection's weight as compiled functions take it (plain, or the prepacked opaque one) and bias."""
    return (module.packed, module.bias) if type(module) is PrepackedLinear else (module.weight, module.bias)


@dataclass
class PrepackChoice:
    """Whether the decoder's projections are prepacked, and why: "setting", "probe", or why not."""

    on: bool
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)  # the probe's medians, when it ran


def apply(model: torch.nn.Module) -> int:
    """Prepack the decoder layers' projections of `model` in place, one at a time (each plain weight is
    freed once its replacement is made, unless something else holds it); returns how many."""
    done = 0
    for parent, name, linear in projections(model):
        setattr(parent, name, PrepackedLinear(linear))
        done += 1
    return done


def unpack(model: torch.nn.Module) -> int:
    """Undo `apply` on whatever it had replaced (a failure part of the way through); returns how many."""
    done = 0
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, PrepackedLinear):
                setattr(parent, child_name, child.plain())
                done += 1
    return done


def why_not(runner) -> str | None:
    """Why this model copy cannot be prepacked; None where it can."""
    if runner.device.type != "cpu":
        return "not a CPU"
    if runner.dtype_choice.int8:
        return "int8"
    if runner.dtype not in DTYPES:
        return f"{str(runner.dtype).replace('torch.', '')} (float32 and bfloat16 only)"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    if runner.dtype == torch.bfloat16 and not bfloat16_kernels():
        return "no oneDNN bfloat16 kernels on this CPU"
    return None


def bfloat16_kernels() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 at least; it refuses to prepack otherwise)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def settle(runner) -> PrepackChoice:
    """Apply CPU_PREPACK to a loaded runner whose dtype is settled (see the module's text); returns the
    choice, also kept as `runner.prepack_choice`, and logs it on one line."""
    setting = runner.settings.cpu_prepack
    why = why_not(runner)
    if setting == "false" or why is not None:
        choice = PrepackChoice(False, "setting" if setting == "false" else why)
    elif setting == "true":
        choice = PrepackChoice(True, "setting")
    elif not runner.packing:
        choice = PrepackChoice(False, "packed forward off")
    else:
        choice = _probe(runner)
    if choice.on:
        try:
            count = apply(runner.model)
        except RuntimeError as exc:  # oneDNN refused (or ran out of memory) part of the way: all plain again
            unpack(runner.model)
            log.warning("CPU_PREPACK: oneDNN could not prepack (%s); plain weights kept", str(exc)[:200])
            choice = PrepackChoice(False, "oneDNN refused")
        else:
            log.info("decoder projections prepacked for oneDNN (CPU_PREPACK=%s, %s): %d projections%s",
                     setting, choice.reason, count, _times(choice))
    elif choice.reason not in ("not a CPU", "setting"):
        log.info("decoder projections plain (CPU_PREPACK=%s: %s)%s", setting, choice.reason, _times(choice))
    runner.prepack_choice = choice
    return choice


def _times(choice: PrepackChoice) -> str:
    if not choice.times_ms:
        return ""
    return (f"; first layer {choice.times_ms['plain']:.2f} ms plain, {choice.times_ms['prepacked']:.2f} ms "
            f"prepacked (median, in turns; kept at <= {PREPACK_MARGIN:.0%})")


@torch.inference_mode()
def _probe(runner) -> PrepackChoice:
    first = packed.text_model(runner).layers[0]
    plain = list(projections(first, prefix="layers.0"))
    try:
        prepacked = [PrepackedLinear(linear) for _, _, linear in plain]
        inputs = packed.layer_inputs(runner, probe_batch(runner))

        def use(modules):
            def run():
                for (parent, name, _), module in zip(plain, modules):
                    setattr(parent, name, module)
                packed.layer(first, inputs)
            return run

        a, b = measure(use([m for _, _, m in plain]), use(prepacked))
    except Exception as exc:  # noqa: BLE001 - a probe that fails leaves the plain weights, the safe choice
        log.warning("CPU_PREPACK probe failed (%s: %s); plain weights kept", exc.__class__.__name__, exc)
        return PrepackChoice(False, "probe failed")
    finally:
        for parent, name, linear in plain:
            setattr(parent, name, linear)
    times = {"plain": round(statistics.median(a) * 1e3, 3), "prepacked": round(statistics.median(b) * 1e3, 3)}
    return PrepackChoice(times["prepacked"] <= times["plain"] * PREPACK_MARGIN, "probe", times)
