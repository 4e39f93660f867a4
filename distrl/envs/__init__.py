"""Multi-turn environments: episodes, tools and sandboxed code."""
