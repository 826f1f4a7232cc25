"""Indexing: layouts, labels, splits and the errors a user meets first."""

from pathlib import Path

import pytest
from audio_trees import DEV_DATA, make_training_tree, tone, write_wav

from kws_lightning.data.index import (
    DataLayoutError,
    detect_layout,
    index_test_layout,
    index_training_layout,
    index_unlabeled,
    which_set,
)
from kws_lightning.labels import make_labels

WORDS = {"yes": 20, "no": 20, "bed": 10, "cat": 10}


def test_labels_order_and_errors():
    assert make_labels(["yes", "no"]) == ["silence", "unknown", "yes", "no"]
    assert len(make_labels()) == 12
    with pytest.raises(ValueError, match="quote them"):
        make_labels([True, False])  # what YAML makes of bare yes/no
    with pytest.raises(ValueError, match="clash"):
        make_labels(["yes", "unknown"])
    with pytest.raises(ValueError, match="repeat"):
        make_labels(["yes", "yes"])


def test_which_set_matches_tf_rule_and_is_speaker_stable():
    # Values from TF's input_data.which_set for these names (sha1 of the part before _nohash_).
    assert which_set("yes/0a7c2a8d_nohash_0.wav") == which_set("no/0a7c2a8d_nohash_3.wav")
    shares = [which_set(f"x/{i:08x}_nohash_0.wav") for i in range(4000)]
    assert 0.08 < shares.count("validation") / 4000 < 0.12
    assert 0.08 < shares.count("testing") / 4000 < 0.12
    assert which_set("x/anything_nohash_0.wav", 0, 0) == "training"
    assert which_set("x/anything_nohash_0.wav", 100, 0) == "validation"


def test_training_layout_labels_and_hash_split(tmp_path):
    root = make_training_tree(tmp_path / "sc", WORDS)
    ds = index_training_layout(root, keywords=["yes", "no"])
    assert ds.labels == ["silence", "unknown", "yes", "no"]
    assert ds.split_source == "speaker-hash"
    assert len(ds.clips) == 60
    assert set(ds.clips.loc[ds.clips.word.isin(["bed", "cat"]), "label"]) == {"unknown"}
    assert ds.clips.loc[ds.clips.word == "yes", "target"].unique().tolist() == [2]
    # Speaker-disjoint: no speaker in two splits.
    assert (ds.clips.groupby("speaker")["split"].nunique() == 1).all()
    assert [p.name for p in ds.noise_files] == ["white_noise.wav"]


def test_lists_override_hash_and_kaggle_layout(tmp_path):
    audio = make_training_tree(tmp_path / "train" / "audio", WORDS)
    (tmp_path / "train" / "validation_list.txt").write_text("yes/00000000_nohash_0.wav\n")
    (tmp_path / "train" / "testing_list.txt").write_text(
        "no/00001eef_nohash_0.wav\nbed/00001eef_nohash_0.wav\n"
    )
    ds = index_training_layout(tmp_path / "train")  # Kaggle: word folders under audio/, lists one up
    assert ds.root == audio.resolve()
    assert ds.split_source == "lists"
    assert ds.split("validation").rel.tolist() == ["yes/00000000_nohash_0.wav"]
    assert sorted(ds.split("testing").rel) == ["bed/00001eef_nohash_0.wav", "no/00001eef_nohash_0.wav"]
    assert len(ds.split("training")) == 57


def test_explicit_split_files_including_training(tmp_path):
    root = make_training_tree(tmp_path / "sc", WORDS)
    train_list = tmp_path / "train.txt"
    train_list.write_text("yes/00000000_nohash_0.wav\nno/00000000_nohash_0.wav\n")
    val_list = tmp_path / "val.txt"
    val_list.write_text("yes/00001eef_nohash_0.wav\n")
    ds = index_training_layout(root, split_files={"training": train_list, "validation": val_list})
    assert sorted(ds.clips.split) == ["training", "training", "validation"]


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing_root", "does not exist"),
        ("no_keywords", "none of the keywords"),
        ("bad_list_entry", "missing under"),
        ("bad_split_key", "unknown keys"),
    ],
)
def test_clear_errors(tmp_path, setup, match):
    root = tmp_path / "sc"
    kwargs = {}
    if setup == "missing_root":
        root = tmp_path / "nowhere"
    elif setup == "no_keywords":
        make_training_tree(root, {"bed": 3})
    elif setup == "bad_list_entry":
        make_training_tree(root, WORDS)
        (root / "validation_list.txt").write_text("yes/does_not_exist_nohash_0.wav\n")
    elif setup == "bad_split_key":
        make_training_tree(root, WORDS)
        kwargs["split_files"] = {"valid": "x.txt"}
    with pytest.raises(DataLayoutError, match=match) as error:
        index_training_layout(root, **kwargs)
    assert str(root.name) in str(error.value) or setup == "bad_split_key"


def test_official_test_layout_and_unlabeled(tmp_path):
    test_root = tmp_path / "test_set"
    write_wav(test_root / "_silence_" / "silence_0.wav", tone(1.0, amp=0.0))
    write_wav(test_root / "_unknown_" / "bed_0a7c2a8d_nohash_0.wav.wav", tone())
    write_wav(test_root / "yes" / "0a7c2a8d_nohash_1.wav", tone())
    write_wav(test_root / "sheila" / "0a7c2a8d_nohash_2.wav", tone())
    ds = index_test_layout(test_root)
    assert dict(zip(ds.clips.word, ds.clips.label, strict=True)) == {
        "_silence_": "silence",
        "_unknown_": "unknown",
        "yes": "yes",
        "sheila": "unknown",
    }
    assert ds.clips.loc[ds.clips.word == "_unknown_", "speaker"].item() == "bed_0a7c2a8d"
    assert detect_layout(test_root) == "test"
    flat = tmp_path / "audio"
    for name in ("clip_b.wav", "clip_a.wav"):
        write_wav(flat / name, tone())
    assert index_unlabeled(flat).fname.tolist() == ["clip_a.wav", "clip_b.wav"]
    assert detect_layout(flat) == "unlabeled"
    assert detect_layout(make_training_tree(tmp_path / "sc", WORDS)) == "training"
    with pytest.raises(DataLayoutError, match="holds no .wav"):
        index_unlabeled(tmp_path / "sc")


@pytest.mark.skipif(not DEV_DATA.is_dir(), reason=f"real dev set not found at {DEV_DATA} (set KWS_DEV_DATA)")
def test_real_dev_set_counts_match_its_readme():
    ds = index_training_layout(DEV_DATA)
    clips = ds.clips
    assert len(clips) == 7009
    assert clips.speaker.nunique() == 1068
    assert ds.split_source == "lists"
    assert (clips.split == "validation").sum() == 721
    assert (clips.split == "testing").sum() == 605
    per_word = clips.word.value_counts()
    expected = {
        "yes": 765,
        "no": 757,
        "up": 778,
        "down": 749,
        "left": 750,
        "right": 752,
        "stop": 765,
        "go": 737,
        "on": 262,
        "off": 260,
    }
    assert {w: per_word[w] for w in expected} == expected
    assert (clips.label == "unknown").sum() == 434
    assert clips.word.nunique() == 35
    assert len(ds.noise_files) == 6
    # The README: the lists are speaker-disjoint.
    assert (clips.groupby("speaker")["split"].nunique() == 1).all()
    assert isinstance(ds.root, Path)
