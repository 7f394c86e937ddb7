"""Files, names and the Hub: our directory format, safe weight loading, atomic writes, checkpoints, `from_pretrained`
name resolution."""
