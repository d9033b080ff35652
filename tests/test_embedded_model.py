"""The embedded default model is built offline, atomically, once."""

from __future__ import annotations

import json

from dotllm import embedded_model


def test_build_is_complete_and_loadable(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = embedded_model.build(tmp_path / "m")
    assert embedded_model.is_built(path)
    config = AutoConfig.from_pretrained(path)
    assert config.vocab_size == 131072
    assert config.architectures == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 131072
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt == "<s>S\n\n[INST] Hi [/INST]"
    ids = tokenizer('{"a": 1}')["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == '{"a": 1}'
    assert not list(tmp_path.glob(".m-*")), "staging directory left behind"


def test_build_is_idempotent_and_force_rebuilds(tmp_path):
    path = embedded_model.build(tmp_path / "m")
    weights = path / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert embedded_model.build(path) == path
    assert weights.stat().st_mtime_ns == first
    embedded_model.build(path, force=True)
    assert weights.stat().st_mtime_ns != first


def test_same_seed_same_weights(tmp_path):
    a = embedded_model.build(tmp_path / "a")
    b = embedded_model.build(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_incomplete_or_stale_directory_is_rebuilt(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    assert not embedded_model.is_built(path)
    embedded_model.build(path)
    assert embedded_model.is_built(path)
    marker = path / "dotllm-model.json"
    marker.write_text(json.dumps({"recipe": embedded_model.RECIPE_VERSION - 1}))
    assert not embedded_model.is_built(path)
    marker.write_text("not json")
    assert not embedded_model.is_built(path)


def test_a_build_that_finishes_second_leaves_the_first_in_place(tmp_path, monkeypatch):
    """Processes that find no model build it side by side (servers or benchmark jobs
    starting on a fresh machine): the one that finishes second must not delete the
    model another process is already reading."""
    path = embedded_model.build(tmp_path / "m")
    weights = path / "model.safetensors"
    first = weights.stat().st_mtime_ns
    real, calls = embedded_model.is_built, []

    def is_built(p):  # not there yet when this builder looked; there when it ends
        calls.append(p)
        return len(calls) > 1 and real(p)

    monkeypatch.setattr(embedded_model, "is_built", is_built)
    assert embedded_model.build(path) == path
    assert weights.stat().st_mtime_ns == first
    assert real(path)
    assert not list(tmp_path.glob(".m-*")), "staging directory left behind"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DOTLLM_CACHE_DIR", str(tmp_path / "c"))
    assert embedded_model.default_model_dir() == tmp_path / "c" / "models" / embedded_model.NAME
    monkeypatch.delenv("DOTLLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert embedded_model.cache_root() == tmp_path / "x" / "dotllm"
