"""Log-mel frames of a live stream for the page's scrolling picture (display only, never fed to a model)."""

from __future__ import annotations

import numpy as np

N_FFT = 512
WIN = 400  # 25 ms at 16 kHz
STEP = 160  # 10 ms
N_MELS = 40
FLOOR_DB = -100.0


class LogMelPreview:
    """Turns chunks of int16 samples into whole log-mel frames (dB, rounded to int), keeping the remainder."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = N_MELS) -> None:
        import librosa

        self.filters = librosa.filters.mel(sr=sample_rate, n_fft=N_FFT, n_mels=n_mels).astype(np.float32)
        self.window = np.hanning(WIN).astype(np.float32)
        self.pending = np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray) -> list[list[int]]:
        audio = np.concatenate([self.pending, samples.astype(np.float32) / 32768.0])
        count = max(0, (len(audio) - WIN) // STEP + 1)
        if count == 0:
            self.pending = audio
            return []
        frames = np.lib.stride_tricks.sliding_window_view(audio, WIN)[::STEP][:count] * self.window
        power = np.abs(np.fft.rfft(frames, N_FFT)) ** 2
        mel_db = 10.0 * np.log10(power @ self.filters.T + 1e-10)
        self.pending = audio[count * STEP :]
        return np.clip(np.rint(mel_db), FLOOR_DB, 40.0).astype(int).tolist()
