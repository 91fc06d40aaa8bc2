"""Model helpers: the generated tiny Llama model and its bundled tokenizer corpus."""
