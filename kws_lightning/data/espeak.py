"""A minimal ctypes binding to espeak-ng, as shipped by the PyPI package `espeakng-loader`.

espeak-ng keeps all its state in C globals and is not thread-safe: use one `Espeak` per process
(`get_engine()`), and run several processes to synthesise in parallel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import numpy as np

_INSTALL_HINT = (
    "install the PyPI package espeakng-loader (`pip install espeakng-loader`, a dependency in "
    "pyproject.toml), which ships libespeak-ng and its voice data"
)

# Values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_INITIALIZE_DONT_EXIT = 0x8000
_EE_OK = 0
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4

# Limits espeak-ng accepts (speak_lib.h): rate in words per minute, the others in 0..100 (volume 0..200).
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 100)
VOLUME_RANGE = (0, 200)

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """espeak-ng is missing or refused a request."""


def library_and_data_paths() -> tuple[Path, Path]:
    """Return (libespeak-ng, espeak-ng-data) from `espeakng_loader`; raise EspeakError naming the fix."""
    try:
        import espeakng_loader
    except ImportError as err:
        raise EspeakError(f"espeak-ng is not available ({err}): {_INSTALL_HINT}") from err
    library = Path(espeakng_loader.get_library_path())
    if not library.is_file():
        raise EspeakError(
            f"espeak-ng library {library} is missing: reinstall espeakng-loader ({_INSTALL_HINT})"
        )
    try:
        data = Path(espeakng_loader.get_data_path())
    except RuntimeError as err:
        raise EspeakError(f"espeak-ng voice data is missing ({err}): reinstall espeakng-loader") from err
    return library, data


def available_variants(data_path: Path | None = None) -> list[str]:
    """Names of the voice variants (`en+<variant>`) shipped in espeak-ng-data/voices/!v."""
    data_path = data_path if data_path is not None else library_and_data_paths()[1]
    variant_dir = data_path / "voices" / "!v"
    return sorted(p.name for p in variant_dir.iterdir() if p.is_file())


class Espeak:
    """espeak-ng in synchronous mode: `synth()` returns the whole utterance as int16 at `sample_rate`."""

    def __init__(self) -> None:
        library_path, data_path = library_and_data_paths()
        try:
            self._lib = ctypes.CDLL(str(library_path))
        except OSError as err:
            raise EspeakError(f"cannot load {library_path} ({err}): {_INSTALL_HINT}") from err
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        # espeak-ng's own random generator (1.52+); older builds lack the setter.
        self._set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_rand_seed is not None:
            self._set_rand_seed.argtypes = [ctypes.c_long]
            self._set_rand_seed.restype = None

        # espeak-ng's parent directory argument is the folder that *contains* espeak-ng-data.
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path.parent).encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed with data at {data_path}: reinstall espeakng-loader")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None
        # Breath noise (whisper voices) draws from libc rand(): reseed it per utterance too.
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name) if libc_name else None

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), num_samples: int, _events: int | None) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = keep synthesising

    def set_voice(self, name: str) -> None:
        """Select a voice such as ``en-us`` or ``en-gb-scotland+f2`` (language + optional variant)."""
        if name == self._voice:
            return
        status = self._lib.espeak_SetVoiceByName(name.encode())
        if status != _EE_OK:
            raise EspeakError(
                f"espeak-ng has no voice {name!r} (status {status}): use a language file under "
                "espeak-ng-data/lang and a variant from available_variants()"
            )
        self._voice = name

    def _set(self, parameter: int, value: int, limits: tuple[int, int], what: str) -> None:
        if not limits[0] <= value <= limits[1]:
            raise EspeakError(f"espeak {what}={value} is outside {limits[0]}..{limits[1]}")
        status = self._lib.espeak_SetParameter(parameter, int(value), 0)
        if status != _EE_OK:
            raise EspeakError(f"espeak_SetParameter({what}={value}) failed with status {status}")

    def synth(
        self,
        text: str,
        *,
        voice: str,
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        volume: int = 100,
        seed: int = 0,
    ) -> np.ndarray:
        """Speak `text`; return int16 samples at `self.sample_rate` (same arguments → same samples)."""
        self.set_voice(voice)
        # Voice changes can reset prosody: set every parameter for every utterance.
        self._set(_PARAM_RATE, rate, RATE_RANGE, "rate")
        self._set(_PARAM_PITCH, pitch, PITCH_RANGE, "pitch")
        self._set(_PARAM_RANGE, pitch_range, PITCH_RANGE, "pitch_range")
        self._set(_PARAM_VOLUME, volume, VOLUME_RANGE, "volume")
        if self._set_rand_seed is not None:
            self._set_rand_seed(seed & 0x7FFFFFFF)
        if self._libc is not None:
            self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise EspeakError(f"espeak_Synth({text!r}, voice={voice!r}) failed with status {status}")
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


_ENGINE: tuple[int, Espeak] | None = None


def get_engine() -> Espeak:
    """The process's espeak-ng engine, created on first use (again in a forked child)."""
    global _ENGINE
    if _ENGINE is None or _ENGINE[0] != os.getpid():
        _ENGINE = (os.getpid(), Espeak())
    return _ENGINE[1]
