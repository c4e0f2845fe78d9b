"""The data plane: `layout` (KV cache tensors -> coalesced byte runs, `RunPlan`), `engine`
(NIXL agent: register, metadata, WRITE runs, notifications) and `ordering` (CUDA-event-gated
transfer thread, D-side GPUDirect flush rule). Each module's docstring is its API."""
