"""LongGen (hybrid full / static-sparse attention layers): the spec, kernels, pruned KV cache and exported
model class all live in `modeling_longext_longgen.py` (torch + transformers only), which export copies next
to the weights."""
