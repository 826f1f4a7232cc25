"""Offline synthetic Speech Commands: espeak-ng voices saying words, plus generated background noise.

Writes the real data set's layout, so everything downstream treats it like the real thing:

    <out>/<word>/<speaker>_nohash_<n>.wav      16 kHz PCM16 mono, 1 s (about 6 % shorter, like the real set)
    <out>/_background_noise_/*.wav             white, pink, brown noise and 50/60 Hz mains hum
    <out>/validation_list.txt, testing_list.txt  speaker-disjoint, by TF's speaker-hash rule
    <out>/synthetic.json                       what was generated and from which parameters

A speaker is one accent + voice variant + pitch + rate + intonation range; its 8-hex-char id is a hash of
those, so the same combination is the same speaker (and lands in the same split) for every seed.

Command line (Hydra-style key=value, no Hydra needed):

    python -m kws_lightning.data.synthetic out=DIR [seed=0] [clips_per_word=200] [words=[yes,no,...]]
        [noise_seconds=60] [workers=2] [overwrite=true]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import operator
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import firwin, lfilter, resample_poly

from kws_lightning.data import espeak
from kws_lightning.labels import BACKGROUND_NOISE_DIR, DEFAULT_KEYWORDS

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
CLIP_SAMPLES = 16_000
# Speech Commands' other 25 words: the `unknown` material.
OTHER_WORDS: tuple[str, ...] = (
    "backward", "bed", "bird", "cat", "dog", "eight", "five", "follow", "forward", "four", "happy",
    "house", "learn", "marvin", "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "visual",
    "wow", "zero",
)  # fmt: skip
DEFAULT_WORDS: tuple[str, ...] = DEFAULT_KEYWORDS + OTHER_WORDS
DEFAULT_CLIPS_PER_WORD = 200
DEFAULT_NOISE_SECONDS = 60.0
VALIDATION_PERCENTAGE = 10.0
TESTING_PERCENTAGE = 10.0
METADATA_FILE = "synthetic.json"
COMPLETE_MARKER = ".complete"
# Bump when the output for given parameters changes: cached sets keyed on the old version are not reused.
GENERATOR_VERSION = 1

# espeak-ng's English accents (espeak-ng-data/lang/gmw) and voice variants (voices/!v); robots, the
# demonic voice and `fast` (which overrides the rate) are left out.
ACCENTS: tuple[str, ...] = (
    "en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc",
)  # fmt: skip
VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "croak", "whisper", "whisperf",
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Denis", "Diogo", "Gene", "Gene2", "Henrique",
    "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "Reed", "RicishayMax",
    "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "adam", "anika", "announcer", "antonio", "aunty",
    "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "edward2", "grandma", "grandpa",
    "gustave", "ian", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta", "linda", "marcelo", "max",
    "michel", "miguel", "mike2", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro",
    "shelby", "steph", "steph2", "steph3", "travis", "victor", "zac",
)  # fmt: skip
PITCHES = tuple(range(15, 90, 5))  # espeak 0..100, default 50
RATES = tuple(range(120, 250, 10))  # words per minute, default 175
PITCH_RANGES = tuple(range(20, 90, 10))  # intonation range, default 50
# How many times a speaker says one word (n = 0, 1, ...): mostly once, like the real set.
REPEAT_PROBS = (0.55, 0.25, 0.12, 0.05, 0.03)
# Speakers per split = per-word clips / mean repeats / this: each speaker says about half the words.
SPEAKER_WORD_COVERAGE = 0.5
SHORT_CLIP_FRACTION = 0.06
PEAK_DBFS = (-24.0, -1.0)  # the real set's 5th..95th percentile clip peaks span about this
SNR_DB = (20.0, 50.0)  # per-clip noise floor below the speech
NOISE_RMS_DBFS = (-52.0, -44.0)  # the real _background_noise_ files sit around -50 dBFS RMS
CLIPS_PER_SHARD = 2000
MAX_SHARDS = 8

_WORD_RE = re.compile(r"^[a-z]+$")
_SPLITS = ("training", "validation", "testing")
_MAX_WAVS_PER_CLASS = 2**27 - 1  # TF's input_data.py constant


@dataclass(frozen=True)
class Speaker:
    """One synthetic voice: espeak accent + variant + base pitch, rate and intonation range."""

    accent: str
    variant: str
    pitch: int
    rate: int
    pitch_range: int

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"

    @property
    def id(self) -> str:
        key = f"{self.voice}:p{self.pitch}:r{self.rate}:g{self.pitch_range}"
        return hashlib.sha1(key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class _Clip:
    word: str
    speaker: Speaker
    n: int
    seed: int

    @property
    def relpath(self) -> str:
        return f"{self.word}/{self.speaker.id}_nohash_{self.n}.wav"


def _split_of(speaker_id: str) -> str:
    """TF's rule (input_data.which_set) on the part of the file name before `_nohash_`."""
    hashed = int(hashlib.sha1(speaker_id.encode()).hexdigest(), 16)
    percentage = (hashed % (_MAX_WAVS_PER_CLASS + 1)) * (100.0 / _MAX_WAVS_PER_CLASS)
    if percentage < VALIDATION_PERCENTAGE:
        return "validation"
    if percentage < VALIDATION_PERCENTAGE + TESTING_PERCENTAGE:
        return "testing"
    return "training"


def _as_int(name: str, value: object, minimum: int) -> int:
    try:
        number = operator.index(value)  # ints and numpy ints; not floats or strings
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return number


@dataclass(frozen=True)
class _Params:
    """The checked, normalised parameters that decide a data set's content (not `workers`)."""

    words: tuple[str, ...]
    clips_per_word: int
    seed: int
    noise_seconds: float

    @classmethod
    def checked(cls, words: Sequence[str] | str, clips_per_word: int, seed: int, noise_seconds: float):
        if isinstance(words, str):  # "yes,no" from a command line or a config string
            words = [w.strip() for w in words.split(",") if w.strip()]
        words = [str(w) for w in words]
        if not words:
            raise ValueError("words is empty: name at least one word, e.g. words=[yes,no]")
        for word in words:
            if not _WORD_RE.match(word):
                raise ValueError(
                    f"word {word!r} has characters other than a-z: words become folder names and espeak "
                    "text, so use lowercase letters only (e.g. 'one', not '1' or 'One')"
                )
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise ValueError(f"words repeat {duplicates}: name each word once")
        try:
            seconds = float(noise_seconds)
        except (TypeError, ValueError):
            seconds = float("nan")
        if not seconds >= 1.0:
            raise ValueError(f"noise_seconds={noise_seconds!r} must be a number >= 1 (real files are ~60 s)")
        return cls(
            tuple(words), _as_int("clips_per_word", clips_per_word, 1), _as_int("seed", seed, 0), seconds
        )

    def as_dict(self) -> dict:
        return {
            "words": list(self.words),
            "clips_per_word": self.clips_per_word,
            "seed": self.seed,
            "noise_seconds": self.noise_seconds,
        }


def _clip_seed(seed: int, speaker_id: str, word: str, n: int) -> int:
    digest = hashlib.sha1(f"{seed}:{speaker_id}:{word}:{n}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _quotas(clips_per_word: int, num_words: int) -> dict[str, list[int]]:
    """Clips per word in each split; rounding carried across words so the totals come out at 80/10/10."""
    fractions = {"validation": VALIDATION_PERCENTAGE / 100, "testing": TESTING_PERCENTAGE / 100}
    quotas: dict[str, list[int]] = {s: [] for s in _SPLITS}
    for i in range(num_words):
        rest = clips_per_word
        for split, fraction in fractions.items():
            q = round(fraction * clips_per_word * (i + 1)) - round(fraction * clips_per_word * i)
            quotas[split].append(q)
            rest -= q
        quotas["training"].append(rest)
    return quotas


def _draw_speakers(rng: np.random.Generator, counts: dict[str, int], variants: Sequence[str]) -> dict:
    """Draw distinct speakers until each split (by the hash rule on their id) has `counts[split]`."""
    pools: dict[str, list[Speaker]] = {s: [] for s in _SPLITS}
    seen: set[str] = set()
    draws_left = 50 * sum(counts.values()) + 1000
    while any(len(pools[s]) < counts[s] for s in _SPLITS):
        draws_left -= 1
        if draws_left < 0:
            raise ValueError(
                f"cannot find {sum(counts.values())} distinct speakers among the voice combinations: "
                "lower clips_per_word"
            )
        speaker = Speaker(
            accent=ACCENTS[rng.integers(len(ACCENTS))],
            variant=variants[rng.integers(len(variants))],
            pitch=PITCHES[rng.integers(len(PITCHES))],
            rate=RATES[rng.integers(len(RATES))],
            pitch_range=PITCH_RANGES[rng.integers(len(PITCH_RANGES))],
        )
        if speaker.id in seen:
            continue
        seen.add(speaker.id)
        split = _split_of(speaker.id)
        if len(pools[split]) < counts[split]:
            pools[split].append(speaker)
    return pools


def _plan(words: Sequence[str], clips_per_word: int, seed: int, variants: Sequence[str]) -> list[_Clip]:
    """Who says what: speaker pools per split, then each word's clips dealt to speakers of each split."""
    rng = np.random.default_rng([seed, 1])
    quotas = _quotas(clips_per_word, len(words))
    mean_repeats = sum((i + 1) * p for i, p in enumerate(REPEAT_PROBS))
    max_repeats = len(REPEAT_PROBS)
    counts = {}
    for split in _SPLITS:
        q = max(quotas[split])
        need = math.ceil(q / mean_repeats / SPEAKER_WORD_COVERAGE) if q else 0
        counts[split] = max(need, math.ceil(q / max_repeats), 2 if q else 0)
    pools = _draw_speakers(rng, counts, variants)

    clips: list[_Clip] = []
    for w, word in enumerate(words):
        for split in _SPLITS:
            remaining = quotas[split][w]
            said: dict[str, int] = {}
            while remaining > 0:
                for i in rng.permutation(len(pools[split])):
                    speaker = pools[split][i]
                    start = said.get(speaker.id, 0)
                    repeats = int(rng.choice(max_repeats, p=REPEAT_PROBS)) + 1
                    repeats = min(repeats, remaining, max_repeats - start)
                    for n in range(start, start + repeats):
                        clips.append(_Clip(word, speaker, n, _clip_seed(seed, speaker.id, word, n)))
                    said[speaker.id] = start + repeats
                    remaining -= repeats
                    if remaining == 0:
                        break
    return clips


def _shards(clips: list[_Clip]) -> list[list[_Clip]]:
    """Speaker-grouped shards that depend only on the plan (never on `workers`): each runs in a fresh
    process, because espeak-ng carries hidden state (pitch flutter phase, gain control) from one utterance
    to the next, so the bytes depend on what the process synthesised before."""
    by_speaker: dict[str, list[_Clip]] = {}
    for clip in clips:
        by_speaker.setdefault(clip.speaker.id, []).append(clip)
    num_shards = max(1, min(MAX_SHARDS, len(by_speaker), math.ceil(len(clips) / CLIPS_PER_SHARD)))
    shards: list[list[_Clip]] = [[] for _ in range(num_shards)]
    done = 0
    for speaker_id in sorted(by_speaker):
        group = by_speaker[speaker_id]
        shards[min(num_shards - 1, done * num_shards // len(clips))].extend(group)
        done += len(group)
    return [s for s in shards if s]


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown), flat below 20 Hz."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    return noise / np.sqrt(np.mean(noise**2))


def _hum(rng: np.random.Generator, n: int, mains_hz: float) -> np.ndarray:
    """Mains hum: the fundamental with decaying (odd-heavy) harmonics, slow drift, and a little hiss."""
    t = np.arange(n) / SAMPLE_RATE
    drift = 1.0 + 0.002 * np.sin(2 * np.pi * rng.uniform(0.02, 0.1) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * mains_hz * np.cumsum(drift) / SAMPLE_RATE
    hum = np.zeros(n)
    for k in range(1, 9):
        amplitude = (1.5 if k % 2 else 1.0) / k
        hum += amplitude * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    hum *= 1.0 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t)
    hum /= np.sqrt(np.mean(hum**2))
    return hum + 0.05 * _coloured_noise(rng, n, 1.0)


def _background_noises(seed: int, seconds: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 2])
    n = round(seconds * SAMPLE_RATE)
    noises = {
        "white_noise": _coloured_noise(rng, n, 0.0),
        "pink_noise": _coloured_noise(rng, n, 1.0),
        "brown_noise": _coloured_noise(rng, n, 2.0),
        "hum_50hz": _hum(rng, n, 50.0),
        "hum_60hz": _hum(rng, n, 60.0),
    }
    return {name: x * 10 ** (rng.uniform(*NOISE_RMS_DBFS) / 20) for name, x in noises.items()}


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


class _ClipRenderer:
    """Turns espeak output into a Speech-Commands-like clip: trimmed, 16 kHz, coloured, placed, noised."""

    def __init__(self) -> None:
        self.engine = espeak.get_engine()
        g = math.gcd(SAMPLE_RATE, self.engine.sample_rate)
        self.up, self.down = SAMPLE_RATE // g, self.engine.sample_rate // g
        # resample_poly's own default filter, designed once rather than per clip.
        max_rate = max(self.up, self.down)
        self.fir = firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))

    def render(self, clip: _Clip) -> np.ndarray:
        rng = np.random.default_rng(clip.seed)
        speaker = clip.speaker
        # Small per-utterance jitter: repeats by one speaker differ, the speaker stays recognisable.
        rate = int(np.clip(speaker.rate + rng.integers(-10, 11), *espeak.RATE_RANGE))
        pitch = int(np.clip(speaker.pitch + rng.integers(-3, 4), *espeak.PITCH_RANGE))
        raw = self.engine.synth(
            clip.word,
            voice=speaker.voice,
            rate=rate,
            pitch=pitch,
            pitch_range=speaker.pitch_range,
            seed=clip.seed,
        )
        speech = raw.astype(np.float64) / 32768.0
        loud = np.flatnonzero(np.abs(speech) > 0.01 * np.abs(speech).max()) if speech.size else []
        if len(loud) == 0:
            raise espeak.EspeakError(
                f"espeak-ng produced no audio for {clip.word!r} with voice {speaker.voice}"
            )
        margin = self.engine.sample_rate // 200  # keep 5 ms around the speech
        speech = speech[max(0, loud[0] - margin) : loud[-1] + margin]
        speech = resample_poly(speech, self.up, self.down, window=self.fir)

        # Channel colour: some clips dull (low-pass), some thin (high-pass), like different microphones.
        kind = rng.integers(3)
        if kind:
            cutoff = rng.uniform(2500.0, 7000.0) if kind == 1 else rng.uniform(80.0, 400.0)
            a = math.exp(-2 * math.pi * cutoff / SAMPLE_RATE)
            low = lfilter([1 - a], [1, -a], speech)
            speech = low if kind == 1 else speech - low
        speech *= 10 ** (rng.uniform(*PEAK_DBFS) / 20) / np.abs(speech).max()

        length = CLIP_SAMPLES
        if rng.random() < SHORT_CLIP_FRACTION:
            shortest = min(max(len(speech) + SAMPLE_RATE // 20, SAMPLE_RATE // 2), CLIP_SAMPLES - 1)
            length = int(rng.integers(shortest, CLIP_SAMPLES))
        if len(speech) > length:  # only at the slowest rates: fade out rather than click
            speech = speech[:length] * np.minimum(1.0, np.arange(length, 0, -1) / (SAMPLE_RATE // 100))
        onset = int(rng.integers(0, length - len(speech) + 1))
        wave = np.zeros(length)
        wave[onset : onset + len(speech)] = speech

        speech_rms = np.sqrt(np.mean(speech**2))
        # Noise floor: white, or white through a one-pole low-pass (a warmer hiss); cheaper than an FFT.
        floor = rng.standard_normal(length)
        if rng.random() < 0.5:
            a = math.exp(-2 * math.pi * rng.uniform(500.0, 4000.0) / SAMPLE_RATE)
            floor = lfilter([1 - a], [1, -a], floor)
        floor /= np.sqrt(np.mean(floor**2))
        wave += floor * speech_rms * 10 ** (-rng.uniform(*SNR_DB) / 20)
        return _to_pcm16(wave)


def _render_shard(job: tuple[str, list[_Clip]]) -> int:
    out_dir, clips = job
    renderer = _ClipRenderer()
    for clip in clips:
        sf.write(Path(out_dir) / clip.relpath, renderer.render(clip), SAMPLE_RATE, subtype="PCM_16")
    return len(clips)


def _variants() -> list[str]:
    shipped = set(espeak.available_variants())
    return [v for v in VARIANTS if v in shipped]


def _espeak_version() -> str:
    try:
        return metadata.version("espeakng-loader")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_list(path: Path, relpaths: Iterable[str]) -> None:
    path.write_text("".join(f"{p}\n" for p in sorted(relpaths)))


def generate_dataset(
    out_dir: str | os.PathLike,
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    clips_per_word: int = DEFAULT_CLIPS_PER_WORD,
    seed: int = 0,
    noise_seconds: float = DEFAULT_NOISE_SECONDS,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Synthesise a Speech-Commands-layout data set into `out_dir` and return its path.

    Same arguments (bar `workers`) → byte-identical files. `workers` processes (default: CPU count)
    synthesise in parallel. `overwrite` replaces an earlier synthetic set in `out_dir`; any other
    non-empty folder is refused.
    """
    params = _Params.checked(words, clips_per_word, seed, noise_seconds)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} is not empty: choose a new folder, "
                "or pass overwrite=true to replace a synthetic set there"
            )
        if not (out / METADATA_FILE).is_file():
            raise FileExistsError(
                f"{out} is not empty and holds no {METADATA_FILE}: this generator did not write it, "
                "so it will not delete it; choose a new folder"
            )
        shutil.rmtree(out)
    workers = _as_int("workers", workers if workers is not None else (os.cpu_count() or 1), 1)

    variants = _variants()
    clips = _plan(params.words, params.clips_per_word, params.seed, variants)
    for word in params.words:
        (out / word).mkdir(parents=True, exist_ok=True)
    shards = _shards(clips)
    jobs = [(str(out), shard) for shard in shards]
    # spawn, one shard per fresh process (see _shards); never fork a parent that may hold CUDA or threads.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(workers, len(jobs)), maxtasksperchild=1) as pool:
        written = sum(pool.map(_render_shard, jobs, chunksize=1))
    assert written == len(clips)

    noise_dir = out / BACKGROUND_NOISE_DIR
    noise_dir.mkdir()
    noises = _background_noises(params.seed, params.noise_seconds)
    for name, noise in noises.items():
        sf.write(noise_dir / f"{name}.wav", _to_pcm16(noise), SAMPLE_RATE, subtype="PCM_16")

    split_of = {c.relpath: _split_of(c.speaker.id) for c in clips}
    _write_list(out / "validation_list.txt", (p for p, s in split_of.items() if s == "validation"))
    _write_list(out / "testing_list.txt", (p for p, s in split_of.items() if s == "testing"))

    speakers: dict[str, dict] = {}
    for clip in clips:
        sp = clip.speaker
        entry = speakers.setdefault(
            sp.id,
            {"voice": sp.voice, "pitch": sp.pitch, "rate": sp.rate, "pitch_range": sp.pitch_range,
             "split": _split_of(sp.id), "clips": 0},
        )  # fmt: skip
        entry["clips"] += 1
    info = {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "espeakng_loader": _espeak_version(),
        "params": params.as_dict(),
        "sample_rate": SAMPLE_RATE,
        "clips": len(clips),
        "clips_by_split": {s: sum(1 for v in split_of.values() if v == s) for s in _SPLITS},
        "background_noise": sorted(f"{name}.wav" for name in noises),
        "speakers": dict(sorted(speakers.items())),
    }
    (out / METADATA_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return out


def dataset_key(
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    clips_per_word: int = DEFAULT_CLIPS_PER_WORD,
    seed: int = 0,
    noise_seconds: float = DEFAULT_NOISE_SECONDS,
) -> str:
    """Short hash naming the cached set for these parameters (plus generator and espeak versions)."""
    params = _Params.checked(words, clips_per_word, seed, noise_seconds).as_dict()
    blob = json.dumps({**params, "version": GENERATOR_VERSION, "espeak": _espeak_version()}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but not ours, or the platform cannot tell: leave it alone
    return True


def ensure_synthetic_dataset(
    cache_dir: str | os.PathLike,
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    clips_per_word: int = DEFAULT_CLIPS_PER_WORD,
    seed: int = 0,
    noise_seconds: float = DEFAULT_NOISE_SECONDS,
    workers: int | None = None,
) -> Path:
    """Return `cache_dir/synthetic-<key>/`, generating it on first use.

    Generation goes to a temporary folder that is renamed into place only when complete (with a
    `.complete` marker), so an interrupted run is never mistaken for a finished set.
    """
    key = dataset_key(words=words, clips_per_word=clips_per_word, seed=seed, noise_seconds=noise_seconds)
    cache = Path(cache_dir)
    target = cache / f"synthetic-{key}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f".synthetic-{key}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = cache / f".synthetic-{key}.tmp-{os.getpid()}"
    log.info("generating the synthetic data set into %s (first use; cached afterwards)", target)
    start = time.perf_counter()
    try:
        generate_dataset(
            tmp,
            words=words,
            clips_per_word=clips_per_word,
            seed=seed,
            noise_seconds=noise_seconds,
            workers=workers,
        )
        (tmp / COMPLETE_MARKER).write_text(f"{key}\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # an unfinished set from some other tool: never reuse it
        try:
            tmp.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
            # Another process finished the same set first: use theirs.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic data set ready in %.1f s", time.perf_counter() - start)
    return target


# ---------------------------------------------------------------------------------------------- CLI

_CLI_KEYS = ("out", "seed", "clips_per_word", "words", "noise_seconds", "workers", "overwrite")
_USAGE = (
    "usage: python -m kws_lightning.data.synthetic out=DIR [seed=0] "
    f"[clips_per_word={DEFAULT_CLIPS_PER_WORD}] [words=[yes,no,...]] "
    f"[noise_seconds={DEFAULT_NOISE_SECONDS:g}] "
    "[workers=N] [overwrite=false]"
)


def _parse_cli(argv: Sequence[str]) -> dict:
    args: dict = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or key not in _CLI_KEYS:
            raise ValueError(f"unexpected argument {arg!r}: use key=value with key in {list(_CLI_KEYS)}")
        try:
            if key in ("seed", "clips_per_word", "workers"):
                args[key] = int(value)
            elif key == "noise_seconds":
                args[key] = float(value)
            elif key == "overwrite":
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                args[key] = value.lower() == "true"
            elif key == "words":
                args[key] = [w.strip().strip("'\"") for w in value.strip("[]").split(",") if w.strip()]
            else:
                args[key] = value
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a valid value for {key}") from None
    if "out" not in args:
        raise ValueError("out=DIR is required: the folder to write the data set into")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(_USAGE)
        return 0
    try:
        args = _parse_cli(argv)
        out = args.pop("out")
        start = time.perf_counter()
        path = generate_dataset(out, **args)
    except (ValueError, FileExistsError, espeak.EspeakError) as err:
        print(f"error: {err}\n{_USAGE}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    info = json.loads((path / METADATA_FILE).read_text())
    by_split = ", ".join(f"{n} {s}" for s, n in info["clips_by_split"].items())
    print(
        f"wrote {info['clips']} clips ({by_split}) of {len(info['params']['words'])} words from "
        f"{len(info['speakers'])} speakers, and {len(info['background_noise'])} noise files, "
        f"to {path} in {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
