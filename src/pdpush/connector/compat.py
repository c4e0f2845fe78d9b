"""May this P write into that D? Both describe themselves; every field must be equal.

D's metadata server (`/meta`) serves D's identity (engine id, per-start instance id) and its
description; P compares it with its own at first contact and refuses the peer with one line
naming the first field that differs (the request is then prefilled on D). The description is
pdpush.vllm_api.engine_identity (model, architecture, dtype, KV-cache dtype, block size,
layers, KV heads per rank, TP size) plus the pdpush protocol version below, and whether the
side has a shared key (a P without one would be ignored by a D with one: refused up front).
"""

from __future__ import annotations

from typing import Any

# Bump when what travels between P and D (push target, notification, /meta) changes meaning.
PROTOCOL_VERSION = 3  # 3: push targets carry issued_s (auth.ReplayGuard)


def describe(identity: dict[str, Any], authenticated: bool) -> dict[str, Any]:
    return {**identity, "protocol": PROTOCOL_VERSION, "authenticated": authenticated}


def mismatch(mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    """"" when P (`mine`) may write into D (`theirs`), else one line naming the field."""
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            return f"D's {name} is {theirs.get(name)!r}, P's is {mine.get(name)!r}"
    return ""


def wrong_d(desc: dict[str, Any], engine_id: str, instance_id: str, url: str) -> str:
    """"" when the side channel at `url` serves the D that signed the target, else why not."""
    found = (desc.get("engine_id"), desc.get("instance_id"))
    if found == (engine_id, instance_id):
        return ""
    return (f"the D at {url} is engine {found[0]} (start {found[1]}), not the {engine_id} "
            f"(start {instance_id}) that sent the request")
