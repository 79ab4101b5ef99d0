"""Dataset preparation and validation for LLM text data."""
