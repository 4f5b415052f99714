"""The start-up hook that lets the package index's (CUDA) torchvision import beside the CPU torch in
vLLM's environment (see benchmarks/vllm_peer.py): written there as `_torchvision_cpu_ops.py` with a
`torchvision_cpu_ops.pth` that imports it."""

from __future__ import annotations

SHIM_MODULE = "_torchvision_cpu_ops"

# The operators torchvision/_meta_registrations.py registers fake kernels for unconditionally at import
# (the others only when its compiled library loaded), with their schemas (torchvision/csrc/ops/nms.cpp,
# quantized/qnms_kernel.cpp).
TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def shim_source() -> str:
    """The start-up hook's module. It does nothing until torchvision is first imported; then, if
    torchvision's compiled library does not load, it declares the operators' schemas (with a kernel that
    raises NotImplementedError) before torchvision's own import runs."""
    ops = "".join(f"    {op!r},\n" for op in TORCHVISION_OPS)
    return f'''"""Declares torchvision's compiled operators when its own library cannot load (a CUDA build
beside the CPU torch), so that its pure-Python parts import. Written by benchmarks/vllm_peer.py."""
import sys

SCHEMAS = (
{ops})


def _declare(root):
    import glob

    import torch

    for library in glob.glob(root + "/_C*.so"):
        try:
            torch.ops.load_library(library)
            return  # torchvision's own operators load: nothing to declare
        except Exception:
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in SCHEMAS:
        name = schema.split("(", 1)[0]

        def missing(*args, _name=name, **kwargs):
            raise NotImplementedError(f"torchvision::{{_name}}: this torchvision's compiled operators do not load")

        lib.define(schema)
        lib.impl(name, missing, "CompositeExplicitAutograd")
    globals()["LIBRARY"] = lib  # keeps the registrations alive


class _Finder:
    """Runs `_declare` once, when `import torchvision` starts; the import itself proceeds as usual."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            try:
                _declare(list(spec.submodule_search_locations)[0])
            except Exception as exc:
                print(f"{{__name__}}: {{exc}}", file=sys.stderr)
        return spec


sys.meta_path.insert(0, _Finder())
'''
