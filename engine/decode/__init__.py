"""The decode path: prefill and decode steps, the one decode layer, K/V segments and attention, the GPU KV cache,
the attention backend and the compiled step."""
