"""Pure pieces of weight sync: bucket plans, plan checks against a checkpoint, the engine's update gate."""

from __future__ import annotations

import json
import struct

import pytest

from psr_ray.weight_sync.gate import EngineUpdatingError, UpdateGate, UpdateState
from psr_ray.weight_sync.plan import (
    bucket_problems,
    checkpoint_spec,
    layer_key,
    plan_buckets,
    plan_problems,
    tied_aliases,
)

LAYER0 = [f"model.layers.0.{p}" for p in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                           "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")]  # fmt: skip
LAYER1 = [n.replace(".0.", ".1.") for n in LAYER0]


def test_layer_key():
    assert layer_key("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("lm_head.weight") == "lm_head"
    assert layer_key("model.norm.weight") == "model.norm"


def test_buckets_never_split_a_layer():
    sizes = [("model.embed_tokens.weight", 40)] + [(n, 10) for n in LAYER0 + LAYER1] + [("model.norm.weight", 5)]
    # 45 bytes a bucket: a layer (50 bytes) does not fit and becomes a bucket of its own, whole.
    assert plan_buckets(sizes, 45) == [["model.embed_tokens.weight"], LAYER0, LAYER1, ["model.norm.weight"]]
    # 60: the norm joins layer 1; the embedding does not fit beside layer 0.
    assert plan_buckets(sizes, 60) == [["model.embed_tokens.weight"], LAYER0, LAYER1 + ["model.norm.weight"]]
    assert plan_buckets(sizes, 10**6) == [[n for n, _ in sizes]]
    for size in range(1, 200):
        buckets = plan_buckets(sizes, size)
        assert [n for b in buckets for n in b] == [n for n, _ in sizes]  # order kept, nothing lost
        for bucket in buckets:
            keys = {layer_key(n) for n in bucket}
            others = [n for b in buckets if b is not bucket for n in b]
            assert not any(layer_key(n) in keys for n in others), (size, bucket)


def test_buckets_keep_order_and_size():
    import torch

    from psr_ray.weight_sync.base import state_dict_bytes

    # One module each (names without a dot would all be one module): 40, 40, 120, 20, 20 bytes.
    state = {f"m{i}.weight": torch.zeros(n) for i, n in enumerate([10, 10, 30, 5, 5])}
    sizes = [(n, t.numel() * t.element_size()) for n, t in state.items()]
    assert plan_buckets(sizes, 80) == [["m0.weight", "m1.weight"], ["m2.weight"], ["m3.weight", "m4.weight"]]
    assert plan_buckets(sizes, 10**6) == [list(state)]
    assert state_dict_bytes(state) == 240


def write_safetensors(path, header: dict) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


def test_checkpoint_spec_reads_headers_only(tmp_path):
    write_safetensors(tmp_path / "model-00001.safetensors", {
        "__metadata__": {"format": "pt"},
        "model.embed_tokens.weight": {"dtype": "BF16", "shape": [100, 8], "data_offsets": [0, 1600]},
        "model.norm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [1600, 1632]},
    })  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert checkpoint_spec(str(tmp_path)) == {"model.embed_tokens.weight": ((100, 8), "bfloat16"),
                                              "model.norm.weight": ((8,), "float32")}  # fmt: skip
    assert tied_aliases(str(tmp_path)) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert checkpoint_spec(str(tmp_path / "missing")) == {}
    (tmp_path / "config.json").write_text("{}")
    assert tied_aliases(str(tmp_path)) == {}


def test_plan_problems():
    spec = {"model.embed_tokens.weight": ((100, 8), "float32"), "model.norm.weight": ((8,), "float32")}
    aliases = {"lm_head.weight": "model.embed_tokens.weight"}
    good = [("model.norm.weight", (8,), "bfloat16"), ("lm_head.weight", (100, 8), "float32")]
    assert plan_problems(good, spec, aliases) == []  # a subset, another float dtype, a tied alias
    bad = [
        ("model.norm.weight", (9,), "float32"),
        ("model.norm.weight", (8,), "float32"),
        ("lm_head.weight", (100, 9), "float32"),
        ("model.layers.7.mlp.up_proj.weight", (8, 8), "float32"),
        ("model.embed_tokens.weight", (100, 8), "int64"),
    ]
    assert plan_problems(bad, spec, aliases) == [
        "model.norm.weight: shape [9], expected [8]",
        "model.norm.weight: sent twice",
        "lm_head.weight: shape [100, 9], expected [100, 8]",
        "model.layers.7.mlp.up_proj.weight: not a weight of this model",
        "model.embed_tokens.weight: dtype int64, expected one of float32, bfloat16, float16",
    ]
    assert plan_problems(bad[3:4], {}, {}) == []  # no checkpoint headers: names and shapes unchecked


def test_bucket_problems():
    plan = [("a", (2, 3), "float32"), ("b", (4,), "float32")]
    assert bucket_problems([("b", (4,), "float32")], plan) == []
    assert bucket_problems([("c", (1,), "float32"), ("a", (3, 2), "float32")], plan) == [
        "c: not in the update's plan",
        "a: [3, 2] float32, the plan said [2, 3] float32",
    ]


def test_gate_refuses_generation_between_begin_and_commit():
    gate = UpdateGate("psr-judge-0", 3)
    gate.check_serving()
    gate.begin(4)
    with pytest.raises(EngineUpdatingError, match=r"engine psr-judge-0 is loading weights \(policy 3 -> 4\)"):
        gate.check_serving()
    with pytest.raises(EngineUpdatingError, match="already|loading"):
        gate.begin(5)
    gate.loaded()
    with pytest.raises(EngineUpdatingError, match="is loaded weights"):
        gate.check_serving()
    assert gate.commit() == 4 and gate.state is UpdateState.SERVING and gate.policy_version == 4
    gate.check_serving()


def test_gate_rollback_keeps_the_old_version_and_broken_serves_nothing():
    gate = UpdateGate("psr-rollout-1", 2)
    gate.begin(3)
    gate.restored()
    assert gate.policy_version == 2 and gate.state is UpdateState.SERVING
    gate.begin(3)
    gate.broke("restore failed")
    with pytest.raises(EngineUpdatingError, match="psr-rollout-1 serves no policy: restore failed"):
        gate.check_serving()
    gate.begin(3)  # a whole update is the way out
    gate.loaded()
    assert gate.commit() == 3
    with pytest.raises(EngineUpdatingError, match="cannot commit an update while serving"):
        gate.commit()


def test_gate_sleep_and_wake():
    gate = UpdateGate("psr-rollout-0", 1)
    gate.sleep()
    with pytest.raises(EngineUpdatingError, match="asleep"):
        gate.check_serving()
    with pytest.raises(EngineUpdatingError, match="asleep"):
        gate.begin(2)
    gate.wake()
    gate.check_serving()
    with pytest.raises(EngineUpdatingError, match="cannot wake up while serving"):
        gate.wake()


def test_without_aliases_sends_a_tied_tensor_once():
    import torch

    from psr_ray.weight_sync.plan import without_aliases

    embedding = torch.zeros(4, 2)
    tied = {"model.embed_tokens.weight": embedding, "model.norm.weight": torch.zeros(2), "lm_head.weight": embedding}
    assert list(without_aliases(tied)) == ["model.embed_tokens.weight", "model.norm.weight"]
    untied = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}
    assert list(without_aliases(untied)) == list(untied)
