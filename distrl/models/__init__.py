"""Models, tokenizers and LoRA: loading, tiny test models, heads, prompt encoding and caches."""
