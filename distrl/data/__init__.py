"""Data: reading examples, preparing prompts, and the packaged tasks."""
