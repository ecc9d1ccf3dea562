"""Metrics shared by training and the pre-training principle-set analysis."""

from .infonce import infonce_metrics, symmetric_infonce

__all__ = ["infonce_metrics", "symmetric_infonce"]
