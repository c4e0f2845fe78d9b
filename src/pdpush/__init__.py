"""pdpush: decode-centric prefill/decode disaggregation for vLLM with layer-wise KV push."""

__version__ = "0.1.0"
