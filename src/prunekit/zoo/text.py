"""Offline English text for calibration and evaluation: the standard library's pydoc topics."""
from __future__ import annotations

import pydoc_data.topics


def pydoc_text() -> str:
    """About 1.4 MB of English prose and code from Python's own documentation, in a fixed order."""
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def split_text(text: str, held_out: float = 0.2) -> tuple[str, str]:
    """Disjoint calibration and evaluation parts (the evaluation part is the tail)."""
    cut = int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]
