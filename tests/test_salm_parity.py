"""The SALM family (Canary-Qwen) against NeMo's ``SALM.generate`` on a tiny random-weight model (tests/nemo_salm_oracle.py).

The checkpoint NeMo's ``save_pretrained`` wrote is converted with ``mlx-canary convert`` (LoRA merged, tokenizer and
LLM config fetched from the local ``pretrained_llm`` directory) and driven through the product's own path
(``load_model`` -> ``CanaryModel.transcribe``): token-identical greedy output at batch 1 and in one left-padded batch,
with the FastConformer output, the projected audio embeddings and the teacher-forced logits close to NeMo's.

The LLM-only mode (``model.llm.disable_adapter()``, text prompt) is compared token for token too, with the adapter
on as a control.

Not compared with NeMo: the published weights (not available offline: the model is random, its dimensions tiny;
benchmarks/salm_bench.py checks float32 tokens at the real dimensions); long audio (SALM.generate has no long-audio
path; ours is the pipeline's chunk plan and token merge, tested here as a product feature); sampling or beam
generation configs (the model card and NeMo's script decode greedily; ours refuses beam search); half precision and
quantized runs (checked to run; their tokens may differ, as NeMo's bf16 would from its float32).
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import nemo_salm_oracle
from mlx_canary import CanaryError, TranscribeOptions, UnsupportedOption, load_model
from mlx_canary.conversion import convert

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def ref(salm_oracle_dir):
    return nemo_salm_oracle.load_reference(salm_oracle_dir)


def with_budget(model_dir, max_new_tokens: int):
    """The generation budget is the converted config's ``max_new_tokens`` (default 128, the model card's): set it
    to the one the oracle gave NeMo's generate."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["max_new_tokens"] = max_new_tokens
    path.write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def model_dir(salm_oracle_dir, ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("salm") / "model"
    convert(salm_oracle_dir / "checkpoint", out)
    return with_budget(out, ref[0]["max_new_tokens"])


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def paths(ref, salm_oracle_dir):
    meta, _ = ref
    return {k: str(salm_oracle_dir / meta["audio_files"][k]) for k in meta["clips"]}


def test_the_converted_directory_names_its_family(model_dir, ref):
    config = json.loads((model_dir / "config.json").read_text())
    meta, _ = ref
    assert config["family"] == "salm"
    assert (config["audio_locator_id"], config["eos_id"], config["pad_id"]) == (
        meta["audio_locator_tag_id"], meta["eos_id"], meta["pad_id"])


def test_prompt_ids_equal_nemos_formatter(model, ref):
    meta, _ = ref
    assert model.prepare().prompt == meta["prompt_ids"]


def test_encoder_and_projection_are_close(model, ref, paths):
    meta, arrays = ref
    from mlx_canary import audio

    net = model.engine.net
    for clip in meta["clips"]:
        wave = audio.load(paths[clip])
        states, projected, lengths = net.audio_embeddings(mx.array(wave[None]), mx.array([len(wave)]))
        n = int(lengths[0])
        assert n == arrays[f"encoder/{clip}"].shape[0], clip
        np.testing.assert_allclose(np.array(states[0, :n]), arrays[f"encoder/{clip}"], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.array(projected[0, :n]), arrays[f"projected/{clip}"], atol=2e-5, rtol=1e-4)


def test_teacher_forced_logits_are_close(model, ref, paths):
    """Scores from the last prompt position on, fed NeMo's own tokens (so a difference cannot snowball)."""
    from mlx_lm.models.cache import KVCache

    from mlx_canary import audio

    meta, arrays = ref
    engine = model.engine
    for clip in meta["clips"]:
        tokens = meta["batch1"][clip]
        encoded = engine.encode([audio.load(paths[clip])])
        prompt_embeddings, _ = engine.prompt_embeddings(encoded, meta["prompt_ids"])
        sequence = mx.concatenate([prompt_embeddings, engine.net.embed(mx.array([tokens]))], axis=1)
        logits = engine.net.llm(None, cache=[KVCache() for _ in engine.net.llm.layers], input_embeddings=sequence)
        ours = np.array(logits[0, prompt_embeddings.shape[1] - 1 :])
        np.testing.assert_allclose(ours, arrays[f"logits/{clip}"], atol=2e-4, rtol=1e-4)


def test_greedy_tokens_equal_nemo_batch1(model, ref, paths):
    meta, _ = ref
    for clip in meta["clips"]:
        result = model.transcribe(paths[clip])
        assert result.tokens == meta["batch1"][clip], clip
        assert result.text == meta["text"][clip].strip()


def test_greedy_tokens_equal_nemo_batched(model, ref, paths):
    """One left-padded batch of every clip (NeMo's batched generate); a row that ends early stops there."""
    meta, _ = ref
    assert any(len(meta["batched"][c]) < meta["max_new_tokens"] for c in meta["clips"])  # the oracle's own check
    results = model.transcribe([paths[c] for c in meta["clips"]], batch_size=len(meta["clips"]))
    assert [r.tokens for r in results] == [meta["batched"][c] for c in meta["clips"]]


@pytest.mark.parametrize(
    "fields, says",
    [
        (dict(target_lang="de"), "translate"),
        (dict(timestamps=True), "timestamps"),
        (dict(source_lang="de"), "Unsupported language"),
        (dict(source_lang="auto"), "one language"),
        (dict(beam_size=4), "greedily"),
        (dict(pnc=False), "punctuation"),
    ],
)
def test_what_the_model_cannot_do_is_refused(model, fields, says):
    with pytest.raises(UnsupportedOption, match=says):
        model.prepare(TranscribeOptions(**fields))


def test_capabilities(model):
    caps = model.capabilities
    assert (caps.languages, caps.timestamps, caps.translation, caps.language_id) == (("en",), False, False, False)


def test_cli_converts_and_transcribes_to_json(salm_oracle_dir, ref, paths, tmp_path):
    meta, _ = ref
    out = tmp_path / "model"
    cli = [sys.executable, "-m", "mlx_canary"]
    subprocess.run(cli + ["convert", str(salm_oracle_dir / "checkpoint"), str(out), "-q"], check=True, timeout=300)
    with_budget(out, meta["max_new_tokens"])
    clips = meta["clips"][:2]
    proc = subprocess.run(cli + ["transcribe", *[paths[c] for c in clips], "--model", str(out), "-f", "json",
                                 "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for clip in clips:
        written = json.loads(next((tmp_path / "out").glob(f"{clip}*.json")).read_text())
        assert written["tokens"] == meta["batch1"][clip]
    refused = subprocess.run(cli + ["transcribe", paths[clips[0]], "--model", str(out), "--timestamps"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr and "timestamps" in refused.stderr


def test_quantized_model_runs(model_dir, ref, paths):
    """8-bit LLM + encoder (group size 32: the tiny widths are multiples of 32). Token agreement with float is a
    benchmark figure (benchmarks/salm_bench.py), not asserted."""
    meta, _ = ref
    quantized = load_model(model_dir, quantize=8, group_size=32)
    assert isinstance(quantized.engine.net.llm.model.layers[0].self_attn.q_proj, __import__("mlx.nn").nn.QuantizedLinear)
    assert isinstance(quantized.engine.net.encoder.layers[0].feed_forward1.linear1,
                      __import__("mlx.nn").nn.QuantizedLinear)
    result = quantized.transcribe(paths[meta["clips"][0]])
    assert 0 < len(result.tokens) <= meta["max_new_tokens"]


def test_half_precision_runs(model_dir, ref, paths):
    meta, _ = ref
    half = load_model(model_dir, dtype="float16")
    assert half.engine.net.dtype == mx.float16
    result = half.transcribe(paths[meta["clips"][0]])
    assert 0 < len(result.tokens) <= meta["max_new_tokens"]


def test_a_salm_checkpoint_without_its_llm_is_refused(salm_oracle_dir, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    config = json.loads((salm_oracle_dir / "checkpoint" / "config.json").read_text())
    config["pretrained_llm"] = str(tmp_path / "missing-llm")
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "model.safetensors").symlink_to(salm_oracle_dir / "checkpoint" / "model.safetensors")
    with pytest.raises(CanaryError, match="pretrained_llm|missing-llm"):
        convert(checkpoint, tmp_path / "out")


def test_long_audio_goes_through_the_chunked_path(model, ref, paths):
    """No NeMo reference (SALM.generate has no long-audio path): the pipeline's chunk plan, one decode per chunk,
    the token merge, progress reports; a 70 s input is decoded as 2+ chunks whose tokens are each NeMo-exact."""
    from mlx_canary import audio

    meta, _ = ref
    wave = np.concatenate([audio.load(paths[c]) for c in meta["clips"][:4]] * 8)
    assert len(wave) / 16000 > 60 and model.needs_chunking(wave)
    seen = []
    result = model.transcribe(wave, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] >= 2
    assert result.tokens and result.text and result.duration == pytest.approx(len(wave) / 16000)


def test_server_transcribes_and_refuses_through_the_seam(model_dir, ref, paths):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
    import http.client
    import uuid

    from server_load import ServerThread

    from mlx_canary.scheduler import Scheduler

    meta, _ = ref
    clip = meta["clips"][0]
    worker = Scheduler(lambda: load_model(model_dir), max_batch_size=4).start()

    def post(fields: dict):
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        data = open(paths[clip], "rb").read()
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                     f"Content-Type: audio/wav\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection(live.host, live.port, timeout=120)
        conn.request("POST", "/v1/audio/transcriptions", body,
                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    try:
        with ServerThread(worker, model_id="canary-qwen") as live:
            status, body = post({"model": "canary-qwen", "response_format": "json"})
            assert status == 200 and body["text"] == meta["text"][clip].strip()
            for fields, says in (({"language": "de"}, "language"),
                                 ({"response_format": "verbose_json", "timestamp_granularities[]": "word"}, "timestamp")):
                status, body = post({"model": "canary-qwen", **fields})
                assert status == 400 and says in body["error"]["message"].lower(), (fields, body)
    finally:
        worker.stop()


def test_llm_only_mode_equals_nemos_disable_adapter(model, ref):
    """NeMo: ``with model.llm.disable_adapter(): model.generate(prompts=[[{"role": "user", "content": m}]])``; ours
    subtracts the merged LoRA's update again (adapter.safetensors). With the adapter on, the text-only answer
    differs (the oracle checks), so the two modes are really told apart."""
    meta, _ = ref
    ask = meta["ask"]
    engine = model.engine
    assert engine.chat_prompt(ask["message"]) == ask["prompt_ids"]
    assert engine.chat(ask["message"]) == ask["adapter_off"]
    assert engine.chat(ask["message"], adapter=True) == ask["adapter_on"]
    transcript = ask["message"].split("\n\n", 1)[1]
    assert model.ask(ask["question"], transcript) == engine.tokenizer.decode(ask["adapter_off"]).strip()


def test_cli_ask(model, model_dir, ref, tmp_path):
    """The command reads a .txt transcript and prints what ``CanaryModel.ask`` answers (NeMo-checked above)."""
    meta, _ = ref
    question, context = meta["ask"]["question"], "Please call Stella and ask her to bring these things."
    transcript = tmp_path / "t.txt"
    transcript.write_text(context + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "mlx_canary", "ask", str(transcript), question,
                           "--model", str(model_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == model.ask(question, context)


def test_a_speech_only_model_refuses_ask():
    with pytest.raises(UnsupportedOption, match="cannot be prompted with text"):
        load_model("demo").ask("Summarize this.", "some transcript")
    proc = subprocess.run([sys.executable, "-m", "mlx_canary", "ask", "some text", "Summarize.", "--model", "demo"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "cannot be prompted with text" in proc.stderr and "Traceback" not in proc.stderr


def test_convert_quantized_8bit_directory_loads_and_runs(salm_oracle_dir, ref, paths, tmp_path):
    meta, _ = ref
    out = tmp_path / "q8"
    convert(salm_oracle_dir / "checkpoint", out, quantize=8, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"bits": 8, "group_size": 32}
    quantized = load_model(with_budget(out, meta["max_new_tokens"]))
    result = quantized.transcribe(paths[meta["clips"][0]])
    assert 0 < len(result.tokens) <= meta["max_new_tokens"]


def test_load_model_converts_a_salm_checkpoint_once(salm_oracle_dir, ref, paths, tmp_path, monkeypatch):
    """``--model CHECKPOINT_DIR`` (as save_pretrained wrote it): converted into the cache on first use, reused."""
    meta, _ = ref
    monkeypatch.setenv("MLX_CANARY_CACHE", str(tmp_path / "cache"))
    first = load_model(salm_oracle_dir / "checkpoint")
    assert first.capabilities.chat and first.engine.config.family == "salm"
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1
    load_model(salm_oracle_dir / "checkpoint")
    assert list((tmp_path / "cache" / "converted").iterdir()) == converted


def test_a_hub_repo_holding_a_salm_checkpoint_is_recognised(salm_oracle_dir, monkeypatch):
    """nvidia/canary-qwen-2.5b holds config.json + model.safetensors and no .nemo: the SALM converter takes it
    (Hub calls faked: no network here)."""
    import huggingface_hub

    from mlx_canary import conversion

    files = {"nvidia/canary-qwen-2.5b": ["config.json", "model.safetensors", "README.md"],
             "nvidia/canary-1b-flash": ["canary-1b-flash.nemo", "README.md"]}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **_: files[repo])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, **_: str(salm_oracle_dir / "checkpoint" / name))
    assert conversion.is_salm_source("nvidia/canary-qwen-2.5b")
    assert not conversion.is_salm_source("nvidia/canary-1b-flash")
    assert not conversion.is_salm_source(salm_oracle_dir / "llm")  # a directory, but an LLM's, not a SALM's


def test_model_card_and_upload_check_of_a_converted_salm(model_dir):
    from mlx_canary import hub

    config = hub._check_model_dir(model_dir)
    card = hub.model_card(config, "me/canary-qwen-mlx", base_model="nvidia/canary-qwen-2.5b")
    assert "base_model: nvidia/canary-qwen-2.5b" in card and "--source-lang en" in card and "translate" not in card
