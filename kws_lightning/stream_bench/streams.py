"""Build long test streams from a split's clips: keyword, unknown-word and silence events at random gaps
over background noise at a chosen SNR, with a ground-truth table (start, end, word). Deterministic for a
seed; the same events are laid out at every SNR (only the noise level differs), so SNRs compare fairly.

The SNR is the stream's: the noise's RMS sits `snr_db` below the median active-speech RMS of the stream's
clips (each clip keeps its own recorded level, as real speakers do). A keyword's start / end are the
first and last 10 ms frame of its clip within 25 dB of the clip's loudest frame (its speech, not the
1 s clip around it), so latency is measured from the end of the word.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kws_lightning.labels import SILENCE, UNKNOWN

SAMPLE_RATE = 16000
SPLITS = ("testing", "validation")
FRAME_S = 0.01
ACTIVE_DB = 25.0  # a frame is speech when within this many dB of the clip's loudest frame
NOISE_PIECE_S = 20.0  # the noise track is pieces of this length from random files and offsets
FADE_S = 0.01
TRUTH_COLUMNS = ["start", "end", "word", "label", "clip_start", "clip_end", "file"]
SILENCE_WORD = "_silence_"


@dataclass(frozen=True)
class StreamRecipe:
    """What a stream is made of; `seed` fixes the events and the noise track, `snr_db` only scales it."""

    duration_s: float = 1800.0
    seed: int = 0
    gap_min_s: float = 0.5
    gap_max_s: float = 1.5
    p_unknown: float = 0.3
    p_silence: float = 0.1

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(f"stream duration_s must be > 0, got {self.duration_s}")
        if not 0 <= self.gap_min_s <= self.gap_max_s:
            raise ValueError(f"need 0 <= gap_min_s <= gap_max_s, got {self.gap_min_s}, {self.gap_max_s}")
        if self.p_unknown < 0 or self.p_silence < 0 or self.p_unknown + self.p_silence >= 1:
            raise ValueError(
                f"p_unknown ({self.p_unknown}) and p_silence ({self.p_silence}) must be >= 0 and sum "
                "below 1 (the rest are keywords)"
            )


@dataclass
class ClipPool:
    """Decoded clips of one split: int16 samples, their word, and their file (relative to the data root)."""

    clips: list[np.ndarray]
    words: list[str]
    files: list[str]
    keywords: list[str]
    noise: list[np.ndarray]  # background recordings, float, each scaled to unit RMS
    description: str


def load_pool(root: str | Path, keywords: Sequence[str], split: str = "testing") -> ClipPool:
    """The clips of `split` (a training-layout folder with split lists, or the speaker-hash split) and its
    _background_noise_ recordings. The training split is refused: a benchmark never scores seen clips."""
    from kws_lightning.data.audio_io import AudioReadError, read_audio_int16
    from kws_lightning.data.index import index_training_layout

    if split not in SPLITS:
        raise ValueError(
            f"split must be one of {SPLITS} (never training: the model has seen those clips), got {split!r}"
        )
    dataset = index_training_layout(root, list(keywords))
    table = dataset.split(split)
    if table.empty:
        raise ValueError(f"{dataset.root} has no {split} clips: nothing to build streams from")
    missing = [k for k in keywords if k not in set(table["word"])]
    if len(missing) == len(keywords):
        raise ValueError(f"{dataset.root}: its {split} split has none of the keywords {list(keywords)}")
    if not dataset.noise_files:
        raise ValueError(
            f"{dataset.root} has no _background_noise_/*.wav: streams need background noise to mix in"
        )
    clips, words, files = [], [], []
    for path, rel, word in zip(table["path"], table["rel"], table["word"], strict=True):
        try:
            clips.append(read_audio_int16(path, SAMPLE_RATE, max_samples=SAMPLE_RATE))
        except AudioReadError:
            continue  # a broken clip is left out of the streams, as eval skips it
        words.append(word)
        files.append(rel)
    noise = []
    for path in dataset.noise_files:
        samples = read_audio_int16(path, SAMPLE_RATE).astype(np.float64)
        rms = float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0
        if rms > 0 and len(samples) >= SAMPLE_RATE:
            noise.append(samples / rms)
    if not noise:
        raise ValueError(f"{dataset.root}: no usable background noise recording (all silent or under 1 s)")
    description = f"{dataset.root} {split} split ({dataset.split_source}): {len(clips)} clips"
    return ClipPool(clips, words, files, list(keywords), noise, description)


def speech_extent(clip: np.ndarray) -> tuple[int, int, float]:
    """(first, last) sample of a clip's speech and its active RMS (float, full scale 1): frames within
    ACTIVE_DB of the loudest 10 ms frame."""
    x = clip.astype(np.float64) / 32768.0
    frame = int(FRAME_S * SAMPLE_RATE)
    count = max(len(x) // frame, 1)
    frames = np.resize(x, count * frame).reshape(count, frame) if len(x) >= frame else x[None]
    power = np.mean(frames**2, axis=1)
    if power.max() <= 0:
        return 0, len(x), 0.0
    active = np.flatnonzero(10 * np.log10(power / power.max() + 1e-20) >= -ACTIVE_DB)
    first, last = int(active[0]) * frame, min(int(active[-1] + 1) * frame, len(x))
    return first, last, float(np.sqrt(power[active].mean()))


@dataclass(frozen=True)
class Event:
    start: int  # stream sample where the clip starts
    clip: int  # index into the pool, -1 for silence
    kind: str  # "keyword", "unknown" or "silence"


def plan_events(pool: ClipPool, recipe: StreamRecipe) -> list[Event]:
    """The events of a stream: kinds drawn with their probabilities, clips taken without replacement
    (every clip of a kind once before any repeats), gaps uniform in [gap_min_s, gap_max_s]."""
    rng = np.random.default_rng(recipe.seed)
    keyword_rows = [i for i, w in enumerate(pool.words) if w in pool.keywords]
    unknown_rows = [i for i, w in enumerate(pool.words) if w not in pool.keywords]
    if not keyword_rows:
        raise ValueError(f"{pool.description}: no keyword clips")
    decks: dict[str, list[int]] = {"keyword": [], "unknown": []}
    rows = {"keyword": keyword_rows, "unknown": unknown_rows}

    def draw(kind: str) -> int:
        if not decks[kind]:
            decks[kind] = [rows[kind][i] for i in rng.permutation(len(rows[kind]))]
        return decks[kind].pop()

    total = int(recipe.duration_s * SAMPLE_RATE)
    events, position = [], 0
    p_unknown = recipe.p_unknown if unknown_rows else 0.0
    while True:
        position += int(rng.uniform(recipe.gap_min_s, recipe.gap_max_s) * SAMPLE_RATE)
        roll = rng.random()
        kind = (
            "unknown" if roll < p_unknown else "silence" if roll < p_unknown + recipe.p_silence else "keyword"
        )
        clip = draw(kind) if kind != "silence" else -1
        length = len(pool.clips[clip]) if clip >= 0 else SAMPLE_RATE
        if position + length > total:
            return events
        events.append(Event(position, clip, kind))
        position += length


def noise_track(pool: ClipPool, samples: int, seed: int) -> np.ndarray:
    """Unit-RMS background noise: NOISE_PIECE_S pieces from random recordings at random offsets, joined
    with short cross-fades (no clicks a model could take for speech onsets)."""
    rng = np.random.default_rng([seed, 1])
    piece = int(NOISE_PIECE_S * SAMPLE_RATE)
    fade = int(FADE_S * SAMPLE_RATE)
    out = np.zeros(samples + piece + fade, np.float64)
    ramp = np.linspace(0.0, 1.0, fade)
    for first in range(0, samples, piece):
        source = pool.noise[rng.integers(len(pool.noise))]
        want = piece + fade
        offset = int(rng.integers(len(source)))
        chunk = np.resize(np.roll(source, -offset), want)  # loops a short recording
        chunk[:fade] *= ramp
        chunk[-fade:] *= ramp[::-1]
        out[first : first + want] += chunk
    return out[:samples]


@dataclass
class Stream:
    audio: np.ndarray  # int16
    truth: pd.DataFrame  # TRUTH_COLUMNS, one row per event, in time order
    snr_db: float
    noise_rms: float


def build_stream(pool: ClipPool, recipe: StreamRecipe, snr_db: float) -> Stream:
    """One stream of `recipe` at `snr_db`: the same events and noise track for every SNR of one seed."""
    events = plan_events(pool, recipe)
    total = int(recipe.duration_s * SAMPLE_RATE)
    extents = {e.clip: speech_extent(pool.clips[e.clip]) for e in events if e.clip >= 0}
    levels = [rms for _, _, rms in extents.values() if rms > 0]
    speech_rms = float(np.median(levels)) if levels else 0.1
    noise_rms = speech_rms / 10.0 ** (snr_db / 20.0)
    audio = noise_track(pool, total, recipe.seed) * noise_rms
    rows = []
    for event in events:
        if event.clip < 0:
            end = event.start + SAMPLE_RATE
            rows.append((event.start, end, SILENCE_WORD, SILENCE, event.start, end, ""))
            continue
        clip = pool.clips[event.clip]
        audio[event.start : event.start + len(clip)] += clip / 32768.0
        first, last, _ = extents[event.clip]
        word = pool.words[event.clip]
        label = word if word in pool.keywords else UNKNOWN
        rows.append(
            (event.start + first, event.start + last, word, label, event.start,
             event.start + len(clip), pool.files[event.clip])
        )  # fmt: skip
    truth = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
    for column in ("start", "end", "clip_start", "clip_end"):
        truth[column] = (truth[column] / SAMPLE_RATE).round(4)
    pcm = np.clip(np.rint(audio * 32768.0), -32768, 32767).astype(np.int16)
    return Stream(pcm, truth, float(snr_db), float(noise_rms))


def stream_name(snr_db: float) -> str:
    return f"stream_snr{snr_db:g}db"


def write_stream(stream: Stream, folder: Path, recipe: StreamRecipe, source: str) -> dict:
    """`<name>.wav` (PCM 16 kHz) + `<name>.csv` (the ground truth); returns its manifest entry."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    name = stream_name(stream.snr_db)
    sf.write(folder / f"{name}.wav", stream.audio, SAMPLE_RATE, subtype="PCM_16")
    stream.truth.to_csv(folder / f"{name}.csv", index=False)
    return {
        "wav": f"{name}.wav",
        "csv": f"{name}.csv",
        "snr_db": stream.snr_db,
        "noise_rms": round(stream.noise_rms, 6),
        "duration_s": len(stream.audio) / SAMPLE_RATE,
        "recipe": asdict(recipe),
        "source": source,
    }


MANIFEST = "streams.json"


def write_manifest(entries: list[dict], folder: Path) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps({"sample_rate": SAMPLE_RATE, "streams": entries}, indent=2))
    return path


def read_streams(folder: str | Path) -> list[tuple[dict, np.ndarray, pd.DataFrame]]:
    """Streams written by `write_stream` (its streams.json), to score another model on the same audio."""
    from kws_lightning.data.audio_io import read_audio_int16

    folder = Path(folder).expanduser()
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{folder} has no {MANIFEST}: pass a streams folder written by stream_eval")
    try:
        entries = json.loads(manifest.read_text())["streams"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest} is not a stream_eval manifest ({error}); rebuild the streams") from None
    out = []
    for entry in entries:
        truth = pd.read_csv(folder / Path(str(entry["csv"])).name)
        missing = set(TRUTH_COLUMNS[:4]) - set(truth.columns)
        if missing:
            raise ValueError(f"{folder / entry['csv']} lacks columns {sorted(missing)}")
        audio = read_audio_int16(folder / Path(str(entry["wav"])).name, SAMPLE_RATE)
        out.append((entry, audio, truth))
    return out
