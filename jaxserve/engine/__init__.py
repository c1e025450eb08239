"""The engine: input processing (validation, tokenization), the synchronous engine core
(`llm_engine`: schedule -> run -> update), output processing (`detokenizer`: incremental
detokenization and stop strings), the Python front ends `LLM` (`llm`) and `AsyncLLM`
(`async_llm`), data-parallel replicas, chat templates and Prometheus metrics.

May import core/, worker/, models/ and the shared modules of `jaxserve`; never
entrypoints/.
"""
