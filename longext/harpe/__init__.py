"""HARPE (per-head RoPE bases): base assignment strategies (`bases.py`) and the modeling code shared by
training, evaluation and the exported model (`modeling_longext_harpe.py`, torch + transformers only)."""
