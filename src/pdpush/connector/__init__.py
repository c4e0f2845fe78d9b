"""pdpush's vLLM v1 KV connector: decode-centric prefill/decode with layer-wise KV push.

Start P and D as plain vLLM OpenAI servers; clients talk to D only:

    from pdpush.connector.config import decode_kv_config, prefill_kv_config
    P:  python -m vllm.entrypoints.openai.api_server --model M --port 8100 \\
            --middleware pdpush.connector.auth_middleware.PushAuthMiddleware \\
            --kv-transfer-config "$(json of prefill_kv_config(auth_key_file='/etc/pdpush/key'))"
    D:  python -m vllm.entrypoints.openai.api_server --model M --port 8000 \\
            --kv-transfer-config "$(json of decode_kv_config(['http://127.0.0.1:8100'],
                                                          auth_key_file='/etc/pdpush/key'))"

Same model, block size and tensor-parallel size on both (P checks at first contact, compat.py).
The key file is shared by D and its Ps; without one, only Ps on D's own host are allowed. Options (PdpushConfig, validated at
start) go in `kv_connector_extra_config`; give each D on a host its own `side_channel_port`,
and a `stats_port` to read live stats (`GET /stats` JSON: free KV blocks, local/remote/fallback
counts, first-token mismatches, per-P load and health; `GET /metrics` the same for Prometheus).

Per request, D's response carries `kv_transfer_params.pdpush`: where the prefill ran
(`prefill`: local / remote / fallback), the P `url`, `skip_tokens` (D's own prefix-cache hit,
not pushed), P's first token when known, and `error` / `pdpush_error` on failures. A client may
send `kv_transfer_params={"pdpush_prefill": "local" | "remote" | "auto"}`.

Files: facade.py (the class vLLM loads: forwards each hook to a half) · halves.py (the two
interfaces and which class implements them per role) · decode_scheduler.py with
decode_request.py (a request's life on D) / decode_worker.py (D) · prefill_scheduler.py /
prefill_worker.py (P) · metadata.py (what travels between halves and between D and P) ·
config.py · kv_region.py (cache tensors as the transfer engine sees them) · stats.py · auth.py,
auth_middleware.py, peer_links.py, compat.py, network.py (who may direct P's writes, and into
which D: docs/architecture.md, "Trust model"). vLLM's
objects are translated in pdpush.vllm_api; the do_prefill client and the side channel live in
pdpush.rpc, the NIXL wrapper and byte-run layout in pdpush.transfer, the local/remote policy in
pdpush.policy. The whole picture: docs/architecture.md.
"""
