"""Tests for mlx_canary.hub with a local stand-in for the Hugging Face Hub (never the network).

``LocalHub`` (tests/model_fixtures.py) serves repos from directories through monkeypatched
``huggingface_hub.list_repo_files`` / ``hf_hub_download`` / ``snapshot_download`` (copying into a fake HF cache, as
the real client does), and can fail a download mid-way or leave a partial file. ``FakeHfApi`` stands in for ``HfApi`` when publishing. The models are
tiny real Canary models (tests/model_fixtures.py), so every path ends in a model that transcribes.
"""

from __future__ import annotations

import fnmatch
import importlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from model_fixtures import LocalHub, build_tiny_model, hf_error  # skips this module when torch is missing

import mlx_canary
from mlx_canary import cache, cli, hub
from mlx_canary.config import ModelConfig
from mlx_canary.errors import CanaryError

huggingface_hub = pytest.importorskip("huggingface_hub")
convert_mod = importlib.import_module("mlx_canary.convert")

NEMO_REPO = "org/tiny-canary"  # holds a .nemo, as nvidia/canary-1b-flash does
MLX_REPO = "org/tiny-canary-mlx"  # holds a converted model directory
CLIP = np.sin(np.arange(16000 * 1.5, dtype=np.float32) * 0.07) * 0.3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("hub-models")
    model_dir = build_tiny_model(root)
    reference = mlx_canary.load_model(model_dir).transcribe(CLIP, source_lang="en")
    return SimpleNamespace(nemo=root / "tiny-canary.nemo", dir=model_dir, reference=reference)


@pytest.fixture
def local_hub(monkeypatch, tmp_path, tiny) -> LocalHub:
    stand_in = LocalHub(tmp_path).install(monkeypatch)
    stand_in.add(NEMO_REPO, {"README.md": b"# tiny\n", ".gitattributes": b"", "tiny-canary.nemo": tiny.nemo})
    stand_in.add(MLX_REPO, {**{p.name: p for p in tiny.dir.iterdir()}, "README.md": b"---\nlibrary_name: mlx\n---\n",
                            "tiny-canary.nemo": tiny.nemo})  # the .nemo must not be downloaded
    return stand_in


@pytest.fixture
def conversions(monkeypatch) -> list:
    """Counts the conversions the cache runs."""
    calls = []
    real = cache.convert

    def spy(source, out_dir, *args, **kwargs):
        calls.append(str(source))
        return real(source, out_dir, *args, **kwargs)

    monkeypatch.setattr(cache, "convert", spy)
    return calls


def cache_entries() -> list:
    """Everything in the converted-model cache, hidden work directories included."""
    converted = cache.cache_root() / "converted"
    return sorted(p.name for p in converted.iterdir()) if converted.is_dir() else []


def same_tokens(model, tiny) -> None:
    assert model.transcribe(CLIP, source_lang="en").tokens == tiny.reference.tokens


# -- loading from the Hub -------------------------------------------------------------------------------------


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_CANARY_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv("MLX_CANARY_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "mlx-canary"


def test_nemo_repo_is_downloaded_and_converted_once(local_hub, conversions, tiny):
    first = mlx_canary.load_model(NEMO_REPO)
    same_tokens(first, tiny)
    assert local_hub.transfers == [(NEMO_REPO, "tiny-canary.nemo")]
    assert len(conversions) == 1
    (entry,) = cache_entries()
    assert entry.startswith("org--tiny-canary-")

    second = mlx_canary.load_model(NEMO_REPO)  # from the cache: no download, no conversion
    same_tokens(second, tiny)
    assert len(local_hub.transfers) == 1 and len(conversions) == 1
    assert cache_entries() == [entry]


def test_local_nemo_is_converted_once(local_hub, conversions, tiny):
    for _ in range(2):
        same_tokens(mlx_canary.load_model(tiny.nemo), tiny)
    assert len(conversions) == 1 and len(cache_entries()) == 1
    assert local_hub.transfers == []


def test_pre_converted_repo_loads_directly(local_hub, conversions, tiny):
    model = mlx_canary.load_model(MLX_REPO)
    same_tokens(model, tiny)
    assert conversions == [] and cache_entries() == []
    fetched = sorted(name for repo, name in local_hub.transfers)
    # the model directory's files and its card; not the .nemo the repo also holds
    assert fetched == sorted([p.name for p in tiny.dir.iterdir()] + ["README.md"])


def test_unknown_repo(local_hub, conversions):
    with pytest.raises(CanaryError, match="Hugging Face repo org/nothing-here not found"):
        mlx_canary.load_model("org/nothing-here")
    assert conversions == [] and cache_entries() == []


def test_interrupted_download_is_one_clear_error_and_leaves_no_cache_entry(local_hub, conversions, tiny):
    local_hub.fail_after_bytes = 1000
    with pytest.raises(CanaryError) as err:
        mlx_canary.load_model(NEMO_REPO)
    message = str(err.value)
    assert message.startswith(f"cannot download {NEMO_REPO} from Hugging Face: ConnectionError: Connection broken")
    assert "\n" not in message
    assert conversions == [] and cache_entries() == []

    # The next try downloads again and works.
    same_tokens(mlx_canary.load_model(NEMO_REPO), tiny)
    assert len(conversions) == 1 and len(cache_entries()) == 1


def test_partial_download_is_one_clear_error_and_leaves_no_cache_entry(local_hub, conversions, tiny):
    local_hub.leave_partial = True  # the file in the HF cache is cut short
    with pytest.raises(CanaryError) as err:
        mlx_canary.load_model(NEMO_REPO)
    message = str(err.value)
    assert f"downloaded from Hugging Face repo {NEMO_REPO}; if that download was interrupted" in message
    assert "delete it and try again" in message and "\n" not in message
    assert len(conversions) == 1 and cache_entries() == []  # the failed conversion left nothing, not even hidden

    # Once the file is complete (deleted and downloaded again), the model converts into a fresh entry.
    partial = local_hub.cache / NEMO_REPO.replace("/", "--") / "tiny-canary.nemo"
    partial.unlink()
    same_tokens(mlx_canary.load_model(NEMO_REPO), tiny)
    assert len(cache_entries()) == 1


def test_interrupted_conversion_leaves_no_cache_entry(local_hub, monkeypatch, tiny):
    def interrupted(path, arrays):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mlx_canary.load_model(NEMO_REPO)
    assert cache_entries() == []
    monkeypatch.undo()  # (also drops the stand-in hub; load the local file instead)
    monkeypatch.setenv("MLX_CANARY_CACHE", str(local_hub.cache.parent / "mlx-canary-cache"))
    same_tokens(mlx_canary.load_model(tiny.nemo), tiny)
    assert len(cache_entries()) == 1


def test_interrupted_snapshot_of_a_converted_repo(local_hub, conversions, tiny):
    local_hub.fail_after_bytes = 10
    with pytest.raises(CanaryError, match=f"^cannot download {MLX_REPO} from Hugging Face: ConnectionError"):
        mlx_canary.load_model(MLX_REPO)
    assert conversions == [] and cache_entries() == []
    same_tokens(mlx_canary.load_model(MLX_REPO), tiny)


def test_damaged_weights_in_a_converted_repo(local_hub, tmp_path):
    weights = local_hub.repos[MLX_REPO] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CanaryError, match=r"model\.safetensors \(corrupt or incomplete file\?\)"):
        mlx_canary.load_model(MLX_REPO)


# -- publishing ----------------------------------------------------------------------------------------------


class FakeHfApi:
    """Records create_repo / upload_folder and copies the uploaded files into ``remote`` (fnmatch ignore rules)."""

    instances: list = []
    remote: Path
    fail_with: BaseException | None = None

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list = []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, token=None, **kwargs):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        return SimpleNamespace(url=f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, ignore_patterns=None,
                      **kwargs):
        self.calls.append(("upload_folder", repo_id, repo_type, commit_message))
        target = FakeHfApi.remote / repo_id.replace("/", "--")
        target.mkdir(parents=True, exist_ok=True)
        for path in Path(folder_path).iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in ignore_patterns or []):
                continue
            shutil.copyfile(path, target / path.name)
        return SimpleNamespace(commit_url="https://huggingface.co/commit")


@pytest.fixture
def fake_api(monkeypatch, tmp_path):
    FakeHfApi.instances = []
    FakeHfApi.remote = tmp_path / "remote"
    FakeHfApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_upload_converted_repo_with_model_card(local_hub, fake_api, tmp_path, tiny):
    out = tmp_path / "converted"
    mlx_canary.convert(NEMO_REPO, out)
    (out / ".model.safetensors.tmp").write_bytes(b"leftover")
    url = hub.upload_model(out, "me/tiny-canary-mlx")
    assert url == "https://huggingface.co/me/tiny-canary-mlx"
    (api,) = fake_api.instances
    assert api.calls[0] == ("create_repo", "me/tiny-canary-mlx", "model", False, True)
    assert api.calls[1][:3] == ("upload_folder", "me/tiny-canary-mlx", "model")

    uploaded = fake_api.remote / "me--tiny-canary-mlx"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(
        ["README.md", "config.json", "model.safetensors", "nemo_config.yaml", "tokenizer_de.model",
         "tokenizer_en.model", "tokenizer_spl_tokens.model"])
    card = (uploaded / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "mlx"
    assert {"mlx", "canary", "speech"} <= set(meta["tags"])
    assert meta["base_model"] == NEMO_REPO
    assert meta["language"] == ["en", "de"]
    assert f'mlx_canary.load_model("me/tiny-canary-mlx")' in card
    assert "mlx-canary transcribe audio.wav --model me/tiny-canary-mlx --source-lang en" in card
    assert "float32" in card

    # What was published loads directly as a pre-converted repo.
    local_hub.add("me/tiny-canary-mlx", {p.name: p for p in uploaded.iterdir()})
    same_tokens(mlx_canary.load_model("me/tiny-canary-mlx"), tiny)


def test_upload_quantized_local_conversion(fake_api, tmp_path, tiny):
    out = tmp_path / "q8"
    mlx_canary.convert(tiny.nemo, out, quantize=8, group_size=32)
    hub.upload_model(out, "me/tiny-q8")
    card = (fake_api.remote / "me--tiny-q8" / "README.md").read_text()
    meta = front_matter(card)
    assert "base_model" not in meta  # converted from a local file: the source repo is unknown
    assert "8-bit quantized (group size 32)" in card
    assert hub.model_card(ModelConfig.load(out), "me/x", base_model="nvidia/canary-1b-flash").count(
        "base_model: nvidia/canary-1b-flash") == 1


def test_base_model_of():
    assert hub.base_model_of("nvidia/canary-1b-flash") == "nvidia/canary-1b-flash"
    assert hub.base_model_of("nvidia/canary-1b-flash@main") == "nvidia/canary-1b-flash"
    assert hub.base_model_of("/home/me/canary.nemo") is None
    assert hub.base_model_of("") is None


def test_upload_errors(fake_api, tmp_path, tiny):
    with pytest.raises(CanaryError, match="'nope' is not a Hugging Face repo id; use ORG/NAME"):
        hub.upload_model(tiny.dir, "nope")
    with pytest.raises(CanaryError, match="model directory not found"):
        hub.upload_model(tmp_path / "missing", "me/x")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny.dir, incomplete)
    (incomplete / "tokenizer_de.model").unlink()
    with pytest.raises(CanaryError, match=r"is incomplete \(missing tokenizer_de\.model\)"):
        hub.upload_model(incomplete, "me/x")
    assert fake_api.instances == []  # nothing was sent

    copy = tmp_path / "copy"
    shutil.copytree(tiny.dir, copy)
    fake_api.fail_with = hf_error("HfHubHTTPError", "401 Unauthorized", status=401)
    with pytest.raises(CanaryError, match=r"not allowed to write to Hugging Face repo me/x: log in .*hf auth login"):
        hub.upload_model(copy, "me/x")
    fake_api.fail_with = ConnectionError("Network is unreachable")
    with pytest.raises(CanaryError, match="cannot upload to Hugging Face repo me/x: ConnectionError"):
        hub.upload_model(copy, "me/x")


def test_cli_convert_quantize_and_upload(fake_api, tmp_path, tiny, capsys):
    out = tmp_path / "cli-q"
    code = cli.main(["convert", str(tiny.nemo), str(out), "--quantize", "8", "--group-size", "32",
                     "--upload-repo", "me/tiny-q8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert ModelConfig.load(out).quantization == {"bits": 8, "group_size": 32}
    assert captured.out.rstrip().endswith("uploaded to https://huggingface.co/me/tiny-q8")
    assert (fake_api.remote / "me--tiny-q8" / "model.safetensors").is_file()
    assert "Traceback" not in captured.err
