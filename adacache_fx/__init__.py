"""adacache_fx: training-free caching for diffusion transformers, as a graph pass.

    import adacache_fx as ax
    pipe.transformer = ax.transform(pipe.transformer, ax.Static(interval=2))
    image = pipe(...).images[0]
    print(ax.report(pipe.transformer))
"""

from .api import compile, generation, get_runtime, is_transformed, policy_state, report, reset, restore, transform
from .errors import (
    AdaCacheError,
    AlreadyTransformedError,
    CacheBudgetError,
    CaptureError,
    NoBlocksFoundError,
    NotTransformedError,
    PolicyError,
)
from .policies.base import (
    KINDS,
    BranchInfo,
    Forecaster,
    GuidanceCacher,
    InGraphDecider,
    InStepDecider,
    InStepSignal,
    MetricGroup,
    Observer,
    Plan,
    Policy,
    StepContext,
)
from .policies.adacache import AdaCache, MoReg
from .policies.duca import DuCa
from .policies.easycache import EasyCache
from .policies.foca import FoCa
from .policies.lemica import LeMiCa, lexicographic_minimax_path, record_costs
from .policies.magcache import MagCache
from .policies.fastercache import FasterCache
from .policies.first_block import FirstBlockCache
from .policies.pab import PAB
from .policies.static import NoCache, Static
from .policies.taylorseer import TaylorSeer
from .policies.teacache import TeaCache
from .policies.toca import ToCa
from .calibrate import Calibration, calibrate
from . import export
from .runtime.captures import CaptureCache
from .runtime.report import Report

__version__ = "0.1.0"

__all__ = [
    "transform", "compile", "restore", "report", "reset", "generation", "get_runtime", "is_transformed",
    "policy_state", "Policy", "Plan", "StepContext", "BranchInfo", "KINDS", "InStepSignal",
    "Observer", "MetricGroup", "Forecaster", "InStepDecider", "InGraphDecider", "GuidanceCacher", "NoCache", "Static", "Report",
    "AdaCache", "MoReg", "PAB", "TeaCache", "FirstBlockCache", "TaylorSeer", "FasterCache", "DuCa", "ToCa",
    "MagCache", "EasyCache", "FoCa", "LeMiCa", "lexicographic_minimax_path", "record_costs",
    "calibrate", "Calibration", "export", "CaptureCache",
    "AdaCacheError", "AlreadyTransformedError", "CacheBudgetError", "CaptureError", "NoBlocksFoundError",
    "NotTransformedError", "PolicyError",
]
