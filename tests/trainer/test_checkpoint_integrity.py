"""Checkpoint integrity: the marker is written only after the contents check out, records every file's size,
and `check_checkpoint` names each kind of damage. Real files in DeepSpeed's and HF's formats (torch.save
archives, safetensors, JSON), laid out as a 2-rank ZeRO-3 checkpoint; the whole trainer writes them in
tests/test_driver_kills.py and tests/trainer/test_trainer_group.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psr_ray.trainer import checkpoint as ckpt


def write_checkpoint(root: Path, *, world_size: int = 2, steps: int = 3) -> Path:
    import torch
    from safetensors.torch import save_file

    shards = root / ckpt.DS_DIR / ckpt.DS_TAG
    shards.mkdir(parents=True)
    for rank in range(world_size):
        torch.save({"module": None, "rank": rank}, shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"rank": rank}}, shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (root / ckpt.DS_DIR / "latest").write_text(ckpt.DS_TAG)
    hf = root / ckpt.HF_DIR
    hf.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    (hf / "tokenizer.json").write_text("{}")
    ckpt.write_metadata(root, policy_version=2, config={"trainer": {"zero_stage": 3}}, metrics=[{"train/loss": 0.5}] * steps,
                        extra={"num_optimizer_steps": steps, "world_size": world_size})  # fmt: skip
    return root


def test_commit_writes_the_marker_last_with_every_files_size(tmp_path):
    root = write_checkpoint(tmp_path / "c")
    assert ckpt.latest_checkpoint(tmp_path) is None  # persisted but not committed: not a checkpoint yet
    ckpt.commit_checkpoint(root)
    marker = ckpt.read_version(root)
    assert marker["policy_version"] == 2 and marker["world_size"] == 2
    files = {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.name != ckpt.VERSION_FILE
    }
    assert marker["files"] == files
    assert ckpt.check_checkpoint(root) == root and ckpt.latest_checkpoint(tmp_path) == root


def test_commit_refuses_zero_optimizer_steps(tmp_path):
    root = write_checkpoint(tmp_path / "c", steps=0)
    with pytest.raises(
        ValueError, match=r"took 0 optimizer steps for policy version 2 .* policy version is not bumped"
    ):
        ckpt.commit_checkpoint(root)
    assert not (root / ckpt.VERSION_FILE).exists()


def test_commit_refuses_a_checkpoint_missing_a_ranks_shard(tmp_path):
    root = write_checkpoint(tmp_path / "c")
    (root / ckpt.DS_DIR / ckpt.DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match=r"incomplete after the fit: no DeepSpeed optimizer shard of rank 1 of 2"):
        ckpt.commit_checkpoint(root)
    assert not (root / ckpt.VERSION_FILE).exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda r: (r / "deepspeed/final/zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 torn"),
            r"deepspeed/final/zero_pp_rank_0_mp_rank_00_model_states.pt has 9 bytes, the marker recorded \d+; "
            r"deepspeed/final/zero_pp_rank_0_mp_rank_00_model_states.pt unreadable",
        ),
        (
            lambda r: (r / "deepspeed/final/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
            r"deepspeed/final/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing; no DeepSpeed optimizer shard of rank 1",
        ),
        (
            lambda r: (r / "hf/config.json").write_text('{"architectures": []}'),
            r"hf/config.json has 21 bytes, the marker recorded \d+; hf/config.json names no model_type",
        ),
        (lambda r: (r / "psr_config.json").write_text("[1, 2, 3]"), r"psr_config.json is not a JSON object"),
        (lambda r: (r / "hf/model.safetensors").write_bytes(b"\x00garbage"), r"model.safetensors unreadable"),
        (
            lambda r: (r / ckpt.VERSION_FILE).write_text('{"policy_version": 2}'),
            r"policy_version.json unreadable \(KeyError",
        ),
    ],
    ids=["torn shard", "lost shard", "config.json", "run config", "weights", "old marker"],
)
def test_check_checkpoint_names_the_damage(tmp_path, damage, message):
    root = ckpt.commit_checkpoint(write_checkpoint(tmp_path / "c"))
    damage(root)
    with pytest.raises(ValueError, match=rf"checkpoint {root} is corrupt: .*{message}"):
        ckpt.check_checkpoint(root)
