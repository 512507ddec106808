"""Data floor: entmax attention registered with transformers, the entmax model, catalogue, adapters, distillation."""
