"""Decode once: formats, bad files reported and skipped, the on-disk cache reused and invalidated."""

import logging

import numpy as np
import pytest
import soundfile as sf
from audio_trees import tone, write_wav

from kws_lightning.data.audio_io import AudioReadError, read_audio_int16
from kws_lightning.data.wave_cache import cache_key, load_or_build


def test_stereo_mixed_and_other_rates_resampled(tmp_path, caplog):
    left, right = tone(0.5, 300, amp=0.2), tone(0.5, 300, amp=0.4)
    stereo = tmp_path / "stereo.wav"
    sf.write(str(stereo), np.stack([left, right], axis=1), 16000, subtype="PCM_16")
    mono = read_audio_int16(stereo)
    assert mono.dtype == np.int16 and mono.shape == (8000,)
    np.testing.assert_allclose(mono, (left.astype(int) + right) / 2, atol=1)

    rate_44k = tmp_path / "44k.wav"
    sf.write(str(rate_44k), tone(1.0, 440, rate=44100), 44100, subtype="PCM_16")
    float_wav = tmp_path / "float.wav"
    sf.write(str(float_wav), tone(1.0, 440).astype(np.float32) / 32768, 16000, subtype="FLOAT")
    with caplog.at_level(logging.WARNING):
        resampled = read_audio_int16(rate_44k)
        read_audio_int16(rate_44k)
    assert resampled.shape == (16000,)
    assert sum("resampling clips at 44100 Hz" in r.message for r in caplog.records) <= 1
    # Same tone, so after resampling it correlates with the native 16 kHz one.
    native = tone(1.0, 440).astype(float)
    corr = np.corrcoef(native[1000:15000], resampled[1000:15000].astype(float))[0, 1]
    assert corr > 0.99
    np.testing.assert_allclose(read_audio_int16(float_wav), tone(1.0, 440), atol=1)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00garbage that is not a wav file"])
def test_corrupt_file_raises_named_error(tmp_path, content):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    with pytest.raises(AudioReadError, match="bad.wav"):
        read_audio_int16(bad)
    with pytest.raises(AudioReadError, match="missing.wav"):
        read_audio_int16(tmp_path / "missing.wav")


def test_cache_decodes_once_reports_failures_and_invalidates(tmp_path, caplog):
    paths = [str(write_wav(tmp_path / f"c{i}.wav", tone(0.25 + 0.25 * i, 200 + 50 * i))) for i in range(3)]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio")
    paths.insert(1, str(bad))
    with caplog.at_level(logging.WARNING):
        cache = load_or_build(paths, tmp_path / "cache")
    assert "skipped 1 of 4 clips" in caplog.text and "broken.wav" in caplog.text
    assert cache.lengths.tolist() == [4000, 0, 8000, 12000]
    assert cache.ok.tolist() == [True, False, True, True]
    assert cache.samples.dtype == np.int16
    np.testing.assert_array_equal(cache.clip(2), tone(0.5, 250))

    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "done.json").is_file()
    stamp = (folders[0] / "samples.npy").stat().st_mtime_ns
    again = load_or_build(paths, tmp_path / "cache")
    assert isinstance(again.samples, np.memmap)  # read back, not decoded again
    assert (folders[0] / "samples.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.samples, cache.samples)
    assert [f.path for f in again.failures] == [str(bad)]

    # Rewriting a clip changes its size/mtime and so the key: the stale cache is not used.
    key = cache_key(paths, 16000)
    write_wav(tmp_path / "c0.wav", tone(0.5, 900))
    assert cache_key(paths, 16000) != key
    rebuilt = load_or_build(paths, tmp_path / "cache")
    assert rebuilt.lengths[0] == 8000
    assert len(list((tmp_path / "cache").iterdir())) == 2
