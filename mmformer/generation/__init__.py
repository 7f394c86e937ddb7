"""Decoding: `DecodingOptions`, the searches over a KV cache, score processors, the checkpoint's rules."""
