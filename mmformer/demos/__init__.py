"""The demos behind `make demo` and `make adapt`: examples of the API, not library code."""
