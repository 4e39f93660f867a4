"""What a run writes as it goes: metrics.jsonl, TensorBoard and other loggers, plots."""
