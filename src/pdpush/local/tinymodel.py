"""A tiny Qwen2-architecture model made locally, so demos and tests run with no download.

Weights are seeded random (not vLLM's dummy loader, whose flat logits make every output ignore the
prompt): embeddings ~ N(0, 1) and other matrices ~ N(0, 0.08), so greedy continuations depend on the
prompt and an equality test between two serving paths can fail. The tokenizer is byte-level with no
merges: one token per byte of text, so a prompt of N ASCII characters is N tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("PDPUSH_CACHE", Path.home() / ".cache" / "pdpush")) / "tiny-qwen2"
EOS = "<|endoftext|>"
EOS_ID = 256  # right after the 256 byte tokens


@dataclass(frozen=True)
class TinySpec:
    """Model shape; small enough for a 2-core CPU, long enough context for the 2000-token protocol."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 8192
    seed: int = 0


# Qwen2-7B's shape (28 layers, hidden 3584, 28 query / 4 KV heads of 128, MLP 18944) with the byte
# tokenizer's 32000-token vocabulary, for GPU benchmarks served with `--load-format dummy`: a
# 7B-sized forward and KV (57 KiB per token in bf16) with nothing to download or generate.
QWEN2_7B_SHAPE = TinySpec(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, vocab_size=32000,
                          max_position_embeddings=32768)


def ensure_tiny_model(path: Path | str | None = None, spec: TinySpec = TinySpec(),
                      weights: bool = True) -> Path:
    """Create the model folder once (config, safetensors weights, tokenizer); return its path.
    Without `weights` only config.json is written: the folder is for vLLM's `--load-format dummy`.

    A folder is reused only if it was made from the same spec, so a changed spec never serves stale
    weights. Writing goes to a temporary folder renamed into place, so a crash leaves nothing half-made.
    """
    target = Path(path) if path else DEFAULT_DIR
    stamp = json.dumps({**asdict(spec), **({} if weights else {"weights": False})}, sort_keys=True)
    if (target / "pdpush-spec.json").exists() and (target / "pdpush-spec.json").read_text() == stamp:
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(tmp, spec)
    _write_weights(tmp, spec, weights)
    (tmp / "pdpush-spec.json").write_text(stamp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _write_tokenizer(folder: Path, spec: TinySpec) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    # Fill the rest of the model's vocabulary with plain words, so every id the model can emit
    # decodes to text (the OpenAI server streams text).
    tok.add_tokens([AddedToken(f"<t{i}>", special=False) for i in range(EOS_ID + 1, spec.vocab_size)])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def _write_weights(folder: Path, spec: TinySpec, weights: bool = True) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **{k: v for k, v in asdict(spec).items() if k != "seed"},
        initializer_range=0.08,
        tie_word_embeddings=False,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        torch_dtype="float32",
    )
    if not weights:
        config.save_pretrained(folder)
        return
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder, safe_serialization=True)
