"""Host bookkeeping of the engine: requests and their lifecycle (`request`), the
continuous-batching scheduler (`scheduler`), the KV page manager with prefix caching and
copy-on-write (`kv_cache_manager`) over the page allocator (`block_pool`).

Pure Python and numpy: nothing here touches a device. May import the shared modules of
`jaxserve` (sampling_params, outputs, config); never worker/, engine/ or entrypoints/.
"""
