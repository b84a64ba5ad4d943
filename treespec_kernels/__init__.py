"""Attention kernels over the paged KV cache, and their torch references.

KV cache layout (shared by the engine, the torch references and the Triton kernels)
----------------------------------------------------------------------------------
Per layer, two tensors ``k_cache`` and ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. A sequence owns a list of
blocks (its *block table*, an int32 row ``[max_blocks]``); token position ``p`` of
the sequence lives in block ``block_table[p // block_size]`` at offset
``p % block_size``. The flat *slot* of that token is
``block_table[p // block_size] * block_size + p % block_size``, so
``k_cache.view(-1, num_kv_heads, head_dim)[slot]`` is its key. The engine allocates
every layer's pair as views of one contiguous ``[2, num_layers, num_blocks, block_size,
num_kv_heads, head_dim]`` tensor, so KV compaction (``compaction.copy_slots``) moves a
slot in all layers with one gather and one scatter.

One forward processes, per sequence ``b``, ``context_lens[b]`` committed tokens
already in the cache (the *prefix*) and ``T_b`` new tokens, whose K/V the model
writes at positions ``context_lens[b] .. context_lens[b] + T_b - 1`` before
attention runs. The new tokens are a decode step (T=1), a prefill chunk (causal),
or a draft token tree (each node sees its ancestors and itself). Queries of all
sequences are concatenated: ``query_start_loc`` (``[B+1]``, int32) gives each
sequence's span.

The import name carries the project's prefix because ``kernels`` is taken: it is
Hugging Face's kernel hub, a dependency of transformers (tests/test_install.py).
"""
