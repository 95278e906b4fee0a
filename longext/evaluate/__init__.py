"""`longext eval`: perplexity against context length, passkey retrieval, and the report (docs/eval.md)."""
