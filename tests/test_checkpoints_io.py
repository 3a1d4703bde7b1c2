"""Checkpoint files are data, never code: no loader unpickles a custom object, and every failure is named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from medsr.errors import CheckpointError
from medsr.export.checkpoints import (
    LoadReport,
    file_sha256,
    load_latentsr_unet,
    load_medvae,
    load_sd_vae,
    read_checkpoint,
)


def leave_mark(path: str) -> None:
    """What the malicious payload would run on unpickling: it creates a file."""
    Path(path).write_text("code ran")


class Payload:
    """An object whose unpickling calls ``leave_mark`` (the shape of an arbitrary-code pickle)."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return leave_mark, (str(self.mark),)


@pytest.mark.parametrize("loader", [load_medvae, load_sd_vae, load_latentsr_unet])
def test_pickle_with_code_is_refused_without_running_it(loader, tmp_path):
    mark = tmp_path / "mark.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "extra": Payload(mark)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refusing to unpickle.*leave_mark.*never runs code"):
        loader(path)
    assert not mark.exists()


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
        read_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_medvae(tmp_path / "absent.ckpt")


def test_state_dict_must_hold_tensors(tmp_path):
    torch.save({"state_dict": {"encoder.conv_in.weight": [1, 2]}}, tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match=r"entry 'encoder\.conv_in\.weight' is a list, not a tensor"):
        load_medvae(tmp_path / "list.ckpt")
    torch.save({"epoch": 3}, tmp_path / "nothing.ckpt")
    with pytest.raises(CheckpointError, match=r"no state dict found"):
        load_sd_vae(tmp_path / "nothing.ckpt")


def test_file_sha256_and_report_for_the_manifest(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 3_000_001)
    assert file_sha256(path, chunk_bytes=1 << 16) == hashlib.sha256(b"x" * 3_000_001).hexdigest()
    report = LoadReport(file="w.bin", sha256="0" * 64, format="compvis", config={"block_out_channels": (1, 2)},
                        ignored_keys=[f"k{i}" for i in range(40)])
    manifest = report.to_dict()
    assert manifest["config"] == {"block_out_channels": [1, 2]}
    assert manifest["ignored_key_count"] == 40 and len(manifest["ignored_keys"]) == 32
