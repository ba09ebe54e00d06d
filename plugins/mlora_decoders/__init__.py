"""Built-in backends for transformers' decoder-only causal LMs (LLaMA, Mistral, Qwen, Gemma, Phi, OLMo, Granite)."""
