"""Data floor: corpus readers, annotations (spaCy), extraction and the memory-mapped store."""
