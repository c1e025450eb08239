"""The device side of a step: the model runner (bucketed, precompiled jitted steps over the
paged KV cache), the persistent per-slot batch state it keeps on the device, and the
on-device sampler.

May import core/ (the scheduler's output it executes), models/, pallas_kernels/ and the
shared modules of `jaxserve`; never engine/ or entrypoints/.
"""
