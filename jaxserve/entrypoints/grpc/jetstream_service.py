"""JetStream's `jetstream_proto.Orchestrator` over the jaxserve engine, so that JetStream
clients and benchmark scripts (e.g. `benchmark_serving.py`) work unchanged.

Decode maps to a greedy request (JetStream samples as its engine is configured; its
reference decoding is greedy) with `max_tokens` and `num_samples`. Each engine delta becomes
one DecodeResponse whose `stream_content.samples` has one entry per sample, in order; only
the sample that advanced has text and token ids in that message.
"""

from __future__ import annotations

import grpc

from jaxserve.entrypoints.grpc.common import EngineCaller, parse_or_abort
from jaxserve.protos import jetstream_pb2 as js
from jaxserve.protos import jetstream_pb2_grpc as js_grpc
from jaxserve.sampling_params import SamplingParams

SERVICE_NAME = js.DESCRIPTOR.services_by_name["Orchestrator"].full_name


def decode_request(msg: js.DecodeRequest) -> tuple[str | list[int], SamplingParams]:
    """(prompt, params) of a DecodeRequest; raises ValueError naming the field."""
    which = msg.WhichOneof("content")
    if which == "text_content":
        prompt: str | list[int] = msg.text_content.text
    elif which == "token_content":
        prompt = list(msg.token_content.token_ids)
    else:
        raise ValueError("content: set text_content or token_content")
    if msg.num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {msg.num_samples}")
    return prompt, SamplingParams(n=max(msg.num_samples, 1), temperature=0.0, max_tokens=msg.max_tokens)


class OrchestratorServicer(js_grpc.OrchestratorServicer):
    def __init__(self, caller: EngineCaller):
        self.caller = caller

    async def Decode(self, request: js.DecodeRequest, context: grpc.aio.ServicerContext):
        prompt, params = await parse_or_abort(context, decode_request, request)
        async for delta in self.caller.generate(context, prompt, params):
            samples = [js.DecodeResponse.StreamContent.Sample() for _ in range(params.n)]
            for c in delta.outputs:
                samples[c.index].text = c.text
                samples[c.index].token_ids.extend(c.token_ids)
            yield js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=samples))

    async def HealthCheck(self, request: js.HealthCheckRequest, context: grpc.aio.ServicerContext):
        admission = self.caller.admission
        engine = self.caller.engine
        live = engine is not None and engine.healthy and admission.ready and not admission.draining
        return js.HealthCheckResponse(is_live=live)
