"""Scoring backends: one interface, one implementation per inference engine."""

from .base import ScoringBackend

__all__ = ["ScoringBackend"]
