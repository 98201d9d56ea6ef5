"""surgery push against a local fake Hub: the uploaded files, the card, and the error paths."""

import pytest
import yaml

from fake_hub import FakeHub
from helpers import run_convert
from surgery.base.errors import SurgeryError
from surgery.checkpoint.hub import checkpoint_files, push


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """CI runs with HF_HUB_OFFLINE=1; these tests talk to a server on 127.0.0.1 only."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory):
    return run_convert(tiny_llama, tmp_path_factory.mktemp("push") / "ckpt", recipe="kvsharer", share_layers=2,
                       threshold=-1.0, num_samples=4, seq_len=16, command="surgery convert tiny --recipe kvsharer")


def test_push_uploads_the_checkpoint_and_card(checkpoint):
    with FakeHub({"tok": "me"}) as hub:
        result = push(checkpoint, "me/tiny-kvsharer", token="tok", endpoint=hub.url)
        files = hub.repos["me/tiny-kvsharer"]["files"]
    expected = {name for name, _ in checkpoint_files(checkpoint)}
    assert set(files) == expected
    assert {"model.safetensors", "config.json", "modeling_surgery.py", "decode_surgery.py", "recipe.yaml",
            "README.md"} <= set(files)
    assert files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert "base_model_relation" not in front and {"surgery", "kvsharer"} <= set(front["tags"])  # nothing trained
    assert 'path = "me/tiny-kvsharer"' in card and "trust_remote_code=True" in card
    assert "surgery convert tiny --recipe kvsharer" in card and "reads the KV cache of layer" in card
    assert result.url.endswith("/me/tiny-kvsharer/commit/1") and not hub.unknown
    assert hub.validated and hub.validated[0]["library_name"] == "transformers"  # the card's YAML was checked


def test_bad_token_is_explained(checkpoint):
    with FakeHub({"tok": "me"}) as hub, pytest.raises(SurgeryError, match="401.*(HF_TOKEN|--token)"):
        push(checkpoint, "me/x", token="wrong", endpoint=hub.url, verify=False)


def test_someone_elses_repo_is_explained(checkpoint):
    with FakeHub({"tok": "me", "theirs": "them"}) as hub:
        push(checkpoint, "them/model", token="theirs", endpoint=hub.url, verify=False)
        with pytest.raises(SurgeryError, match="no write access to them/model"):
            push(checkpoint, "them/model", token="tok", endpoint=hub.url, verify=False)


def test_dropped_connection_then_rerun_completes(checkpoint, monkeypatch):
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # huggingface_hub's own retries, without waiting
    with FakeHub({"tok": "me"}) as hub:
        hub.drop_commits = 100  # down for longer than huggingface_hub retries
        with pytest.raises(SurgeryError, match="connection to the Hub was lost.*run the same command again"):
            push(checkpoint, "me/flaky", token="tok", endpoint=hub.url, verify=False)
        assert hub.repos["me/flaky"]["files"] == {}
        hub.drop_commits = 0
        push(checkpoint, "me/flaky", token="tok", endpoint=hub.url, verify=False)
        assert "model.safetensors" in hub.repos["me/flaky"]["files"]


def test_broken_checkpoint_is_not_uploaded(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with FakeHub({"tok": "me"}) as hub:
        with pytest.raises(SurgeryError, match="failed to load"):
            push(broken, "me/broken", token="tok", endpoint=hub.url)
        assert "me/broken" not in hub.repos


def test_dry_run_lists_files_with_sizes(checkpoint):
    from click.testing import CliRunner

    from surgery.cli.main import main

    result = CliRunner().invoke(main, ["push", str(checkpoint), "me/x", "--dry-run", "--no-verify"])
    assert result.exit_code == 0, result.output
    size = (checkpoint / "model.safetensors").stat().st_size
    assert f"{size:,}" in result.output and "model.safetensors" in result.output and "nothing uploaded" in result.output


def test_offline_mode_is_explained(checkpoint, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with FakeHub({"tok": "me"}) as hub, pytest.raises(SurgeryError, match="HF_HUB_OFFLINE is set"):
        push(checkpoint, "me/x", token="tok", endpoint=hub.url, verify=False)
