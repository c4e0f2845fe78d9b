"""The built-in tiny model: byte tokenizer, every model id decodable, folder reuse keyed by spec."""

import json

import pytest

from pdpush.local.tinymodel import EOS_ID, TinySpec, ensure_tiny_model

SMALL = TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=300, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("m") / "tiny", SMALL)


def test_folder_has_what_vllm_loads(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["eos_token_id"] == EOS_ID


def test_one_token_per_byte_and_all_ids_decode(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "pdpush: 42 ~!"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert len(tok) == SMALL.vocab_size
    assert tok.decode([SMALL.vocab_size - 1]) == f"<t{SMALL.vocab_size - 1}>"


def test_reuse_same_spec_rebuild_on_change(model_dir):
    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_tiny_model(model_dir, SMALL) == model_dir
    assert weights.stat().st_mtime_ns == mtime
    other = TinySpec(**{**SMALL.__dict__, "seed": 1})
    ensure_tiny_model(model_dir, other)
    assert json.loads((model_dir / "pdpush-spec.json").read_text())["seed"] == 1
    assert not list(model_dir.parent.glob("*.tmp*"))


def test_weights_depend_on_seed(tmp_path):
    from safetensors.numpy import load_file

    a = load_file(ensure_tiny_model(tmp_path / "a", SMALL) / "model.safetensors")
    b = load_file(ensure_tiny_model(tmp_path / "b", TinySpec(**{**SMALL.__dict__, "seed": 7})) / "model.safetensors")
    key = "model.embed_tokens.weight"
    assert a[key].std() > 0.5  # N(0, 1) embeddings, not the loader's flat init
    assert (a[key] != b[key]).any()


def test_config_only_folder_for_dummy_weights(tmp_path):
    from pdpush.local.tinymodel import QWEN2_7B_SHAPE

    path = ensure_tiny_model(tmp_path / "m", QWEN2_7B_SHAPE, weights=False)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 28 and config["num_key_value_heads"] == 4
    assert config["hidden_size"] // config["num_attention_heads"] == 128  # head_dim
    assert not list(path.glob("*.safetensors"))
    assert (path / "tokenizer.json").exists()
