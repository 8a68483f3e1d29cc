"""Errors raised by adacache_fx. Each message names the problem and what to do about it."""


class AdaCacheError(Exception):
    """Base class of every error adacache_fx raises."""


class NoBlocksFoundError(AdaCacheError):
    """The model has no recognisable list of repeated transformer blocks."""


class CaptureError(AdaCacheError):
    """A transformer block could not be captured into a graph."""


class AlreadyTransformedError(AdaCacheError):
    """transform() was called on a model that is already transformed."""


class NotTransformedError(AdaCacheError):
    """An adacache_fx function that needs a transformed model got a plain one."""


class PolicyError(AdaCacheError):
    """A policy asked for something the model does not have (a branch kind, a block)."""


class CacheBudgetError(AdaCacheError):
    """The residual caches grew beyond ``transform(..., cache_budget=...)``."""
