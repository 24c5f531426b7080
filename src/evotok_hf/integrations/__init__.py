"""Bridges from EvoTok to third-party tools (lmms-eval, ...). Each bridge imports its tool only inside its own modules,
so `import evotok_hf` never needs one installed."""
