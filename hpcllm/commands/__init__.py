"""Click commands, one module per area; each only parses options and calls library code."""
