"""Generation engines beyond Hugging Face's generate: vLLM, for policies and for Q-networks."""
