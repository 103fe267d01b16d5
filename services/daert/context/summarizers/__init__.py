"""How older turns are condensed: one module per strategy that writes a summary."""

from daert.context.summarizers.abstractive import AbstractiveSummarizer
from daert.context.summarizers.base import Condensing, Summarizer, Summary
from daert.context.summarizers.extractive import ExtractiveSummarizer

__all__ = ["AbstractiveSummarizer", "Condensing", "ExtractiveSummarizer", "Summarizer", "Summary"]
