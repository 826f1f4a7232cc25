"""Index Speech Commands folders into clip tables (one row per clip), without decoding audio.

Three layouts are read:
- training: ``<root>/<word>/<speaker>_nohash_<n>.wav`` + ``_background_noise_/`` + optional split lists
  (also Kaggle's ``train/audio`` with the lists one level up, and torchaudio's
  ``<root>/SpeechCommands/speech_commands_v0.0X/``);
- official test set: ``<word>/``, ``_unknown_/`` (``<word>_<speaker>_nohash_<n>.wav.wav``), ``_silence_/``;
- unlabeled: a flat folder of clips (Kaggle ``test/audio``) for prediction.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from kws_lightning.labels import BACKGROUND_NOISE_DIR, DEFAULT_KEYWORDS, SILENCE, UNKNOWN, make_labels

SPLITS = ("training", "validation", "testing")
LIST_FILES = {"validation": "validation_list.txt", "testing": "testing_list.txt"}
TEST_SET_SILENCE_DIR = "_silence_"
TEST_SET_UNKNOWN_DIR = "_unknown_"
# torchaudio's SPEECHCOMMANDS(root, download=True) unpacks into <root>/SpeechCommands/speech_commands_v0.0X.
TORCHAUDIO_FOLDER = "SpeechCommands"
# TF's speech_commands input_data.py: hashing modulus for the stable speaker split.
_MAX_NUM_WAVS_PER_CLASS = 2**27 - 1
_NOHASH = re.compile(r"_nohash_.*$")
CLIP_COLUMNS = ["path", "rel", "word", "label", "target", "speaker", "split"]


class DataLayoutError(ValueError):
    """The folder does not look like the layout asked for; the message names the path and the fix."""


@dataclass
class IndexedDataset:
    """Clips of one folder, labelled and split, plus the background-noise files beside them."""

    root: Path
    labels: list[str]
    clips: pd.DataFrame
    noise_files: list[Path] = field(default_factory=list)
    split_source: str = "speaker-hash"
    # Folders whose clips joined the training split only (`add_extra_training_roots`), in their order.
    extra_roots: list[Path] = field(default_factory=list)

    def split(self, name: str) -> pd.DataFrame:
        return self.clips[self.clips["split"] == name].reset_index(drop=True)


def speaker_of(filename: str) -> str:
    """The speaker id: the basename up to ``_nohash_`` (TF's rule)."""
    return _NOHASH.sub("", Path(filename).name)


def _hash_percentage(key: str) -> float:
    """TF's stable hash of a string, as a percentage in [0, 100]."""
    hashed = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return (int(hashed, 16) % (_MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / _MAX_NUM_WAVS_PER_CLASS)


def cv_fold_of(speaker: str, num_folds: int) -> int:
    """The cross-validation fold of a speaker: a stable hash (salted, so it does not follow TF's split)."""
    return int(_hash_percentage(f"kws-cv-fold:{speaker}") * num_folds / 100.0) % num_folds


def assign_cv_fold(
    clips: pd.DataFrame, fold: int, num_folds: int, validation_percentage: float
) -> pd.DataFrame:
    """Speaker-disjoint k-fold split of the training + validation clips (the testing list is dropped, never
    seen): fold `fold`'s speakers become ``testing`` (the held-out fold); of the other speakers
    `validation_percentage` % (by a second stable hash) become this fold's ``validation`` draw, the rest
    ``training``. The same speakers land in the same fold on every machine and for every recipe."""
    if num_folds < 2:
        raise DataLayoutError(f"data.num_folds={num_folds}: cross-validation needs at least 2 folds")
    if not 0 <= fold < num_folds:
        raise DataLayoutError(
            f"data.fold={fold} is out of range: use 0..{num_folds - 1} (data.num_folds={num_folds})"
        )
    pool = clips[clips["split"] != "testing"].copy()
    speakers = pool["speaker"]
    held_out = speakers.map(lambda s: cv_fold_of(s, num_folds)) == fold
    validation = speakers.map(lambda s: _hash_percentage(f"kws-cv-validation:{s}")) < validation_percentage
    pool["split"] = "training"
    pool.loc[validation, "split"] = "validation"
    pool.loc[held_out, "split"] = "testing"
    return pool.reset_index(drop=True)


def which_set(filename: str, validation_percentage: float = 10.0, testing_percentage: float = 10.0) -> str:
    """TF's stable split: sha1 of the speaker id decides, so a speaker never straddles two splits."""
    percentage = _hash_percentage(speaker_of(filename))
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def _require_dir(root: str | Path, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataLayoutError(
            f"{what} {path} does not exist or is not a folder: set data.root (or input=) to a Speech "
            "Commands folder, e.g. data.root=../shared/data/speech_commands_dev"
        )
    return path.resolve()


def _word_dirs(root: Path) -> dict[str, Path]:
    return {
        d.name: d
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_")) and any(d.glob("*.wav"))
    }


def _torchaudio_version_dir(path: Path) -> Path:
    """torchaudio's download layout, ``<root>/SpeechCommands/speech_commands_v0.0X/``, given its root or
    its ``SpeechCommands`` folder: the version folder inside (an error naming them when there are two)."""
    base = path / TORCHAUDIO_FOLDER if (path / TORCHAUDIO_FOLDER).is_dir() else path
    if base.name != TORCHAUDIO_FOLDER:
        return path
    versions = sorted(d for d in base.glob("speech_commands_v*") if d.is_dir() and _word_dirs(d))
    if len(versions) > 1:
        raise DataLayoutError(
            f"{base} holds {len(versions)} Speech Commands versions ({', '.join(d.name for d in versions)}): "
            f"point data.root at one of them, e.g. data.root={versions[-1]}"
        )
    return versions[0] if versions else path


def find_audio_root(root: str | Path) -> Path:
    """`root` itself, Kaggle's ``<root>/audio`` when the word folders live there, or the version folder
    of torchaudio's layout (``<root>/SpeechCommands/speech_commands_v0.02``)."""
    path = _require_dir(root, "data root")
    if _word_dirs(path):
        return path
    if (path / "audio").is_dir() and _word_dirs(path / "audio"):
        return path / "audio"
    return _torchaudio_version_dir(path)


def _find_list(audio_root: Path, name: str) -> Path | None:
    # Kaggle keeps the lists one level above train/audio.
    for folder in (audio_root, audio_root.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def read_split_list(list_file: str | Path, audio_root: Path) -> list[str]:
    """Relative clip paths of a split list; every entry must exist under `audio_root`."""
    list_path = Path(list_file).expanduser()
    if not list_path.is_file():
        raise DataLayoutError(f"split list {list_path} does not exist: fix data.split_files or remove it")
    entries = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    missing = [e for e in entries if not (audio_root / e).is_file()]
    if missing:
        raise DataLayoutError(
            f"split list {list_path} names {len(missing)} file(s) missing under {audio_root}, first: "
            f"{missing[:3]}. Point data.root at the folder the list was written for, or drop the list "
            "(the split then follows the speaker-hash rule)."
        )
    return entries


def _label_for(word: str, keywords: Sequence[str]) -> str:
    return word if word in keywords else UNKNOWN


def _clip_rows(words: Mapping[str, Path], keywords: Sequence[str]) -> list[dict]:
    """One row per clip of the word folders, labelled, all ``training`` (splits are assigned after)."""
    return [
        {
            "path": str(wav),
            "rel": f"{word}/{wav.name}",
            "word": word,
            "label": _label_for(word, keywords),
            "speaker": speaker_of(wav.name),
            "split": "training",
        }
        for word, folder in words.items()
        for wav in sorted(folder.glob("*.wav"))
    ]


def _table(rows: list[dict], labels: list[str]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=CLIP_COLUMNS)
    table["target"] = table["label"].map({name: i for i, name in enumerate(labels)}).astype("int64")
    return table


def index_training_layout(
    root: str | Path,
    keywords: Sequence[str] = DEFAULT_KEYWORDS,
    validation_percentage: float = 10.0,
    testing_percentage: float = 10.0,
    split_files: Mapping[str, str | Path] | None = None,
    fold: int | None = None,
    num_folds: int = 5,
) -> IndexedDataset:
    """Index a training-layout folder and assign every clip to training / validation / testing.

    Split precedence: explicit `split_files` ({"validation": path, "testing": path, optionally
    "training": path}), then the folder's own ``validation_list.txt`` / ``testing_list.txt``, then the
    speaker-hash rule with the given percentages. Every non-keyword word folder is ``unknown``.
    With `fold` set, that split's training + validation clips are re-split for cross-validation
    (`assign_cv_fold`): held-out fold = ``testing``.
    """
    labels = make_labels(keywords)
    audio_root = find_audio_root(root)
    words = _word_dirs(audio_root)
    if not set(keywords) & set(words):
        raise DataLayoutError(
            f"none of the keywords {list(keywords)} has a folder of .wav files under {audio_root} "
            f"(found: {sorted(words)[:12] or 'no word folders'}). Check data.root, or set data.keywords "
            "to words that are there."
        )
    clips = _table(_clip_rows(words, keywords), labels)

    explicit = dict(split_files or {})
    unknown_keys = set(explicit) - set(SPLITS)
    if unknown_keys:
        raise DataLayoutError(f"data.split_files has unknown keys {sorted(unknown_keys)}; valid: {SPLITS}")
    lists = {name: explicit.get(name) or _find_list(audio_root, LIST_FILES[name]) for name in LIST_FILES}
    if explicit.get("training"):
        lists["training"] = explicit["training"]
    if any(lists.values()):
        split_source = "lists"
        clips["split"] = "training" if not lists.get("training") else "excluded"
        for name in ("training", "validation", "testing"):
            if lists.get(name):
                listed = set(read_split_list(lists[name], audio_root))
                clips.loc[clips["rel"].isin(listed), "split"] = name
        clips = clips[clips["split"] != "excluded"].reset_index(drop=True)
    else:
        split_source = "speaker-hash"
        clips["split"] = [which_set(rel, validation_percentage, testing_percentage) for rel in clips["rel"]]
    if fold is not None:
        clips = assign_cv_fold(clips, fold, num_folds, validation_percentage)
        split_source = f"cv fold {fold}/{num_folds} held out as testing, of the {split_source}"
    clips["source"] = str(audio_root)
    noise_dir = audio_root / BACKGROUND_NOISE_DIR
    noise_files = sorted(noise_dir.glob("*.wav")) if noise_dir.is_dir() else []
    return IndexedDataset(audio_root, labels, clips, noise_files, split_source)


def add_extra_training_roots(
    dataset: IndexedDataset, roots: Sequence[str | Path], keywords: Sequence[str] = DEFAULT_KEYWORDS
) -> IndexedDataset:
    """`dataset` with every clip of each folder in `roots` (training layout, e.g. synthetic speech)
    appended as ``training``, whatever that folder's own lists say; `source` names the folder.

    Appended after the main clips, so the main clips keep their row numbers (and the validation / test
    draws, which are made of row numbers, stay exactly as without them). Word folders are labelled as
    the main root's are; an extra folder's ``_background_noise_`` is not used.
    """
    fix = (
        "fix the path in data.extra_training_roots, write the folder (e.g. `python -m "
        "kws_lightning.data.synthetic out=DIR`), or leave it out (data.extra_training_roots=[]; when "
        "scoring a checkpoint: python -m kws_lightning.eval ... extra_training_roots=[])"
    )
    seen = {dataset.root}
    tables = [dataset.clips]
    extra_roots = list(dataset.extra_roots)
    for root in roots:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataLayoutError(f"extra training folder {path} does not exist or is not a folder: {fix}")
        audio_root = find_audio_root(path)
        words = _word_dirs(audio_root)
        if not words:
            raise DataLayoutError(
                f"extra training folder {audio_root} has no word folders of .wav files "
                f"(<word>/<speaker>_nohash_<n>.wav): {fix}"
            )
        if audio_root in seen:
            # The same clips twice, or the main root's validation / test clips trained on.
            raise DataLayoutError(
                f"extra training folder {audio_root} is data.root or is listed twice: {fix}"
            )
        seen.add(audio_root)
        table = _table(_clip_rows(words, keywords), dataset.labels)
        table["source"] = str(audio_root)
        tables.append(table)
        extra_roots.append(audio_root)
    clips = pd.concat(tables, ignore_index=True) if len(tables) > 1 else dataset.clips
    return replace(dataset, clips=clips, extra_roots=extra_roots)


def index_test_layout(root: str | Path, keywords: Sequence[str] = DEFAULT_KEYWORDS) -> IndexedDataset:
    """Index the official test-set layout: ``_silence_/``, ``_unknown_/`` and keyword folders."""
    labels = make_labels(keywords)
    audio_root = _require_dir(root, "test-set folder")
    folders = sorted(d for d in audio_root.iterdir() if d.is_dir() and any(d.glob("*.wav")))
    if not folders:
        raise DataLayoutError(f"test-set folder {audio_root} has no sub-folders with .wav files")
    rows = []
    for folder in folders:
        if folder.name == TEST_SET_SILENCE_DIR:
            label = SILENCE
        elif folder.name == TEST_SET_UNKNOWN_DIR:
            label = UNKNOWN
        else:
            label = _label_for(folder.name, keywords)
        for wav in sorted(folder.glob("*.wav")):
            rows.append(
                {
                    "path": str(wav),
                    "rel": f"{folder.name}/{wav.name}",
                    "word": folder.name,
                    "label": label,
                    "speaker": speaker_of(wav.name),
                    "split": "testing",
                }
            )
    clips = _table(rows, labels)
    clips["source"] = str(audio_root)
    return IndexedDataset(audio_root, labels, clips, split_source="folder")


def index_unlabeled(root: str | Path) -> pd.DataFrame:
    """All ``*.wav`` files of a flat folder (Kaggle ``test/audio``), sorted by name: columns path, fname."""
    folder = _require_dir(root, "input folder")
    wavs = sorted(folder.glob("*.wav"))
    if not wavs:
        raise DataLayoutError(f"input folder {folder} holds no .wav files")
    return pd.DataFrame({"path": [str(p) for p in wavs], "fname": [p.name for p in wavs]})


def detect_layout(root: str | Path) -> str:
    """``"test"`` (official test set), ``"training"`` (word folders) or ``"unlabeled"`` (flat clips)."""
    folder = _require_dir(root, "input folder")
    if (folder / TEST_SET_SILENCE_DIR).is_dir() or (folder / TEST_SET_UNKNOWN_DIR).is_dir():
        return "test"
    if _word_dirs(find_audio_root(folder)):
        return "training"
    if any(folder.glob("*.wav")):
        return "unlabeled"
    raise DataLayoutError(
        f"{folder} is neither a Speech Commands training folder (word folders), an official test set "
        "(_silence_/, _unknown_/, keyword folders) nor a folder of .wav clips"
    )
