"""Raw input → tensors: images, audio and text (the tokenizer)."""
