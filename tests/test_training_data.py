"""Training data: Pick-a-Pic parquet/arrow, JSONL pairs and captioned folders built in tmp_path from real
PNG/JPEG bytes; tie policy, errors, flips, and the encoding cache."""

from __future__ import annotations

import io
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader

from npo_merge.errors import FormatError, InputError, NpoMergeError
from npo_merge.training import data as D
from npo_merge.training.objectives import get_objective, tie_winner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """A synthetic gradient with a seed-dependent tint, encoded as real PNG/JPEG bytes."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, seed * 40 % 256)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


LABELS = [1.0, 0.0, 0.5, 1.0, 0.5]  # jpg_0 wins, jpg_1 wins, tie, jpg_0 wins, tie


def _pickapic_table(labels=LABELS) -> "pa.Table":
    n = len(labels)
    return pa.table({
        "caption": [f"caption {i}" for i in range(n)],
        "jpg_0": [_image_bytes(24 + i, 16, 2 * i) for i in range(n)],
        "jpg_1": [_image_bytes(16, 20 + i, 2 * i + 1, "JPEG") for i in range(n)],
        "label_0": labels,
    })


@pytest.fixture
def parquet_dir(tmp_path):
    folder = tmp_path / "pickapic"
    folder.mkdir()
    pq.write_table(_pickapic_table(), folder / "train-00000-of-00001.parquet", row_group_size=2)
    return folder


def _pixels(data: bytes, size: int = 16, flip: bool = False) -> torch.Tensor:
    return D.image_to_tensor(data, (size, size), flip=flip)[0]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def test_image_to_tensor_range_size_and_exact_values():
    # a 2x2 image kept at 2x2: 0 -> -1, 255 -> +1
    buf = io.BytesIO()
    Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]], [[255, 0, 0], [0, 0, 255]]], np.uint8)).save(buf, "PNG")
    pixels, orig, crop = D.image_to_tensor(buf.getvalue(), (2, 2))
    assert pixels.shape == (3, 2, 2) and orig == (2, 2) and crop == (0, 0)
    assert pixels[:, 0, 0].tolist() == [-1, -1, -1] and pixels[:, 0, 1].tolist() == [1, 1, 1]
    assert pixels[:, 1, 0].tolist() == [1, -1, -1]
    flipped = D.image_to_tensor(buf.getvalue(), (2, 2), flip=True)[0]
    assert torch.equal(flipped, pixels.flip(-1))


@pytest.mark.parametrize("w,h", [(40, 20), (20, 40), (33, 17), (16, 16)])
@pytest.mark.parametrize("flip", [False, True])
def test_cover_resize_center_crop_geometry(w, h, flip):
    data = _image_bytes(w, h, 1)
    pixels, orig, crop = D.image_to_tensor(data, (16, 16), flip=flip)
    assert pixels.shape == (3, 16, 16) and orig == (h, w)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert D.image_geometry(data, (16, 16), flip=flip) == (orig, crop)
    # the crop is centered on the long side: for 40x20 -> 32x16, left = 8
    if (w, h) == (40, 20):
        assert crop == (0, 8)


def test_undecodable_bytes_name_their_origin():
    with pytest.raises(InputError, match="row 3 jpg_0: cannot decode"):
        D.image_to_tensor(b"not an image", (8, 8), where="row 3 jpg_0")


# --------------------------------------------------------------------------------------------
# Pick-a-Pic
# --------------------------------------------------------------------------------------------


def test_parquet_pairs_drop_ties_and_orient_winners(parquet_dir):
    table = _pickapic_table()
    ds = D.PairDataset(D.open_pickapic(parquet_dir), 16)
    assert (ds.num_rows, ds.num_ties, ds.ties_dropped, len(ds)) == (5, 2, 2, 3)
    assert "5 rows: 3 pairs, 2 ties dropped" in ds.summary()
    jpg0, jpg1 = table.column("jpg_0").to_pylist(), table.column("jpg_1").to_pylist()
    # kept rows 0, 1, 3; row 1 has label_0 = 0 so jpg_1 is its winner
    for index, (row, win) in enumerate([(0, 0), (1, 1), (3, 0)]):
        item = ds[index]
        assert item["caption"] == f"caption {row}"
        winner, loser = (jpg0[row], jpg1[row]) if win == 0 else (jpg1[row], jpg0[row])
        assert torch.equal(item["winner"], _pixels(winner)) and torch.equal(item["loser"], _pixels(loser))


@pytest.mark.parametrize("objective,expected_winner", [("dpo", 0), ("dpo-npo", 1)])
def test_keeping_ties_reproduces_the_official_scripts(parquet_dir, objective, expected_winner):
    ties = tie_winner(objective, keep_ties=True)
    ds = D.PairDataset(D.open_pickapic(parquet_dir), 16, ties=ties)
    assert len(ds) == 5 and ds.ties_dropped == 0 and "2 ties kept" in ds.summary()
    table = _pickapic_table()
    tie = ds[2]  # row 2 is a tie
    assert torch.equal(tie["winner"], _pixels(table.column(f"jpg_{expected_winner}")[2].as_py()))
    assert tie_winner(objective) == "drop"
    # official NPO: the reversed loss now pulls towards the tie's *loser* slot, i.e. jpg_0, as the NPO script did
    assert get_objective(objective).reverse == (expected_winner == 1)


def test_missing_column_is_named(tmp_path):
    pq.write_table(_pickapic_table().drop(["label_0"]), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"missing column\(s\) label_0"):
        D.open_pickapic(tmp_path / "x.parquet")


def test_unreadable_image_names_the_row(tmp_path):
    table = _pickapic_table([1.0, 1.0]).set_column(1, "jpg_0", pa.array([_image_bytes(8, 8, 0), b"\x89PNG broken"]))
    pq.write_table(table, tmp_path / "x.parquet")
    ds = D.PairDataset(D.open_pickapic(tmp_path / "x.parquet"), 8)
    ds[0]
    with pytest.raises(InputError, match="x.parquet row 1 jpg_0: cannot decode"):
        ds[1]


def test_bad_label_and_empty_sets(tmp_path):
    pq.write_table(_pickapic_table([1.0, 2.0]), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="row 1: label_0 must be a number in"):
        D.PairDataset(D.open_pickapic(tmp_path / "bad.parquet"))
    pq.write_table(_pickapic_table([0.5, 0.5]), tmp_path / "ties.parquet")
    with pytest.raises(InputError, match="all 2 are ties"):
        D.PairDataset(D.open_pickapic(tmp_path / "ties.parquet"))
    pq.write_table(_pickapic_table([]), tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="it is empty"):
        D.PairDataset(D.open_pickapic(tmp_path / "empty.parquet"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="no .parquet or .arrow files"):
        D.open_pickapic(tmp_path / "nothing")


def _write_arrow_stream(table, path):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_datasets_cache_arrow_files_with_splits(tmp_path):
    # the layout `datasets` leaves in its cache: <builder>-<split>-NNNNN-of-NNNNN.arrow, IPC stream format
    table = _pickapic_table()
    _write_arrow_stream(table, tmp_path / "pickapic_v2-train-00000-of-00001.arrow")
    _write_arrow_stream(table.slice(0, 2), tmp_path / "pickapic_v2-test-00000-of-00001.arrow")
    _write_arrow_stream(table.slice(0, 1), tmp_path / "cache-1234abcd.arrow")  # a .map() cache: ignored
    with pytest.raises(InputError, match="several splits .*test, train"):
        D.open_pickapic(tmp_path)
    ds = D.PairDataset(D.open_pickapic(tmp_path, split="train"), 16)
    assert len(ds) == 3
    assert torch.equal(ds[1]["winner"], _pixels(table.column("jpg_1")[1].as_py()))
    with pytest.raises(InputError, match="no files of split 'validation'"):
        D.open_pickapic(tmp_path, split="validation")


def test_image_feature_struct_columns(tmp_path):
    # `datasets` Image() columns are stored as struct<bytes, path>
    plain = _pickapic_table([0.0])
    as_struct = lambda col: pa.array([{"bytes": b, "path": None} for b in plain.column(col).to_pylist()])  # noqa: E731
    table = pa.table({"caption": plain["caption"], "jpg_0": as_struct("jpg_0"), "jpg_1": as_struct("jpg_1"),
                      "label_0": plain["label_0"]})
    pq.write_table(table, tmp_path / "s.parquet")
    ds = D.PairDataset(D.open_pickapic(tmp_path / "s.parquet"), 16)
    assert torch.equal(ds[0]["winner"], _pixels(plain.column("jpg_1")[0].as_py()))


def test_missing_pyarrow_says_how_to_install(monkeypatch, parquet_dir):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(NpoMergeError, match=r"pip install 'npo-merge\[train\]'"):
        D.open_pickapic(parquet_dir)


# --------------------------------------------------------------------------------------------
# JSONL pairs
# --------------------------------------------------------------------------------------------


def _jsonl(tmp_path, records):
    (tmp_path / "img").mkdir(exist_ok=True)
    for name, seed in [("a.png", 0), ("b.jpg", 1), ("c.png", 2)]:
        (tmp_path / "img" / name).write_bytes(_image_bytes(20, 16, seed, "JPEG" if name.endswith("jpg") else "PNG"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def test_jsonl_pairs_both_forms(tmp_path):
    path = _jsonl(tmp_path, [
        {"caption": "x", "image_0": "img/a.png", "image_1": "img/b.jpg", "label_0": 0},
        {"caption": "y", "winner": "img/c.png", "loser": "img/a.png"},
        {"caption": "z", "image_0": "img/a.png", "image_1": "img/c.png", "label_0": 0.5},
    ])
    ds = D.PairDataset(D.open_pair_jsonl(path), 16)
    assert len(ds) == 2 and ds.num_ties == 1
    img = lambda n: (tmp_path / "img" / n).read_bytes()  # noqa: E731
    assert torch.equal(ds[0]["winner"], _pixels(img("b.jpg"))) and torch.equal(ds[0]["loser"], _pixels(img("a.png")))
    assert ds[1]["caption"] == "y" and torch.equal(ds[1]["winner"], _pixels(img("c.png")))


def test_jsonl_errors_name_line_and_file(tmp_path):
    path = _jsonl(tmp_path, [{"caption": "x", "image_0": "img/a.png", "label_0": 1}])
    with pytest.raises(InputError, match=r"pairs.jsonl line 1: missing field\(s\) image_1"):
        D.open_pair_jsonl(path)
    path = _jsonl(tmp_path, [{"caption": "x", "winner": "img/a.png", "loser": "img/gone.png"}])
    ds = D.PairDataset(D.open_pair_jsonl(path), 16)
    with pytest.raises(InputError, match="line 1 jpg_1: cannot read image file .*gone.png"):
        ds[0]
    path.write_text("{not json\n")
    with pytest.raises(InputError, match="line 1: not valid JSON"):
        D.open_pair_jsonl(path)


# --------------------------------------------------------------------------------------------
# Flips, pickling, collation
# --------------------------------------------------------------------------------------------


def test_random_flip_is_shared_by_the_pair_and_reproducible(parquet_dir):
    ds = D.PairDataset(D.open_pickapic(parquet_dir), 16, random_flip=True, seed=3)
    table = _pickapic_table()
    flips_by_epoch = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        flips_by_epoch.append([ds[i]["flip"] for i in range(len(ds))])
    assert any(any(f) for f in flips_by_epoch) and not all(all(f) for f in flips_by_epoch)
    ds.set_epoch(0)
    assert [ds[i]["flip"] for i in range(len(ds))] == flips_by_epoch[0]
    for i, (row, win) in enumerate([(0, 0), (1, 1), (3, 0)]):
        item = ds[i]
        w = table.column(f"jpg_{win}")[row].as_py()
        l = table.column(f"jpg_{1 - win}")[row].as_py()
        assert torch.equal(item["winner"], _pixels(w, flip=item["flip"]))
        assert torch.equal(item["loser"], _pixels(l, flip=item["flip"]))


def test_dataset_pickles_and_collates(parquet_dir):
    ds = D.PairDataset(D.open_pickapic(parquet_dir), 16)
    ds[0]  # opens files and fills the row-group cache, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["loser"], ds[2]["loser"])
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["winner"].shape == (3, 3, 16, 16) and batch["caption"] == ["caption 0", "caption 1", "caption 3"]
    assert batch["winner_original_size"].shape == (3, 2)


# --------------------------------------------------------------------------------------------
# Captioned folders and caption lists (Self-NPO)
# --------------------------------------------------------------------------------------------


def test_captioned_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_image_bytes(20, 30, 0))
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "sub" / "b.jpg").write_bytes(_image_bytes(30, 20, 1, "JPEG"))
    (tmp_path / "sub" / "b.txt").write_text("a blue thing")
    (tmp_path / "c.png").write_bytes(_image_bytes(8, 8, 2))
    with pytest.raises(InputError, match="1 image.* have no .txt caption, e.g. c.png"):
        D.CaptionedImageFolder(tmp_path, 16)
    ds = D.CaptionedImageFolder(tmp_path, 16, missing_captions="skip")
    assert len(ds) == 2 and ds.num_skipped == 1
    item = ds[1]
    assert item["caption"] == "a blue thing" and item["image"].shape == (3, 16, 16)
    assert item["image_original_size"].tolist() == [20, 30]


def test_captioned_folder_empty(tmp_path):
    with pytest.raises(InputError, match="no captioned images"):
        D.CaptionedImageFolder(tmp_path, 16)


def test_read_captions(tmp_path):
    (tmp_path / "c.txt").write_text("one\n\ntwo\n")
    assert D.read_captions(tmp_path / "c.txt") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"caption": "x"}\n{"caption": "y"}\n')
    assert D.read_captions(tmp_path / "c.jsonl") == ["x", "y"]
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(InputError, match="no captions"):
        D.read_captions(tmp_path / "e.txt")


# --------------------------------------------------------------------------------------------
# Encoding cache
# --------------------------------------------------------------------------------------------


class CountingEncoders:
    """Stand-ins for the VAE and text encoder that record every call."""

    def __init__(self):
        self.images = 0
        self.captions: list[str] = []

    def encode_images(self, pixels):
        self.images += pixels.shape[0]
        mean = torch.nn.functional.avg_pool2d(pixels, 2)
        return {"mean": mean, "logvar": torch.zeros_like(mean)}

    def encode_captions(self, captions):
        self.captions += captions
        return {"prompt_embeds": torch.tensor([[float(len(c)), 1.0] for c in captions])}


def test_cache_fill_then_hits_without_encoding(parquet_dir, tmp_path):
    ds = D.PairDataset(D.open_pickapic(parquet_dir), 16, random_flip=True, seed=1)
    cache = D.EncodingCache(tmp_path / "cache", "toy-vae+clip:fp32")
    enc = CountingEncoders()
    cached = D.fill_cache(ds, cache, encode_images=enc.encode_images, encode_captions=enc.encode_captions, batch_size=4)
    assert enc.images == 3 * 2 * 2  # 3 pairs x 2 images x 2 orientations
    assert sorted(enc.captions) == ["caption 0", "caption 1", "caption 3"]
    # a second pass (a later epoch or a resumed fill) encodes nothing
    again = CountingEncoders()
    cached = D.fill_cache(ds, cache, encode_images=again.encode_images, encode_captions=again.encode_captions)
    assert again.images == 0 and again.captions == []
    for epoch in range(2):
        ds.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(ds)):
            raw, hit = ds[i], cached[i]
            assert hit["flip"] == raw["flip"]
            assert torch.equal(hit["winner"]["mean"], torch.nn.functional.avg_pool2d(raw["winner"][None], 2)[0])
            assert torch.equal(hit["loser"]["mean"], torch.nn.functional.avg_pool2d(raw["loser"][None], 2)[0])
            assert torch.equal(hit["winner_crop_top_left"], raw["winner_crop_top_left"])
            assert hit["text"]["prompt_embeds"][0].item() == len(raw["caption"])
    batch = next(iter(DataLoader(cached, batch_size=3)))
    assert batch["winner"]["mean"].shape == (3, 3, 8, 8)


def test_cache_is_safetensors_and_keyed_by_encoder(parquet_dir, tmp_path):
    ds = D.PairDataset(D.open_pickapic(parquet_dir), 16)
    cache = D.EncodingCache(tmp_path / "cache", "vae-a")
    enc = CountingEncoders()
    cached = D.fill_cache(ds, cache, encode_images=enc.encode_images, encode_captions=enc.encode_captions)
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 6 + 3 and not list((tmp_path / "cache").rglob("*.tmp"))
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["encoder_id"] == "vae-a"
    # another encoder identity misses every entry
    other = CountingEncoders()
    D.fill_cache(ds, D.EncodingCache(tmp_path / "cache", "vae-b"), encode_images=other.encode_images,
                 encode_captions=other.encode_captions)
    assert other.images == 6
    # an index reopens the cache without touching the images, but only for the same encoder
    cached.save_index(tmp_path / "index.json")
    reopened = D.CachedDataset.load_index(tmp_path / "index.json", cache)
    assert torch.equal(reopened[2]["loser"]["mean"], cached[2]["loser"]["mean"])
    with pytest.raises(InputError, match="indexes encodings by 'vae-a'"):
        D.CachedDataset.load_index(tmp_path / "index.json", D.EncodingCache(tmp_path / "cache", "vae-b"))


def test_cache_get_put_roundtrip_and_missing_entry(tmp_path):
    cache = D.EncodingCache(tmp_path, "enc")
    key = cache.text_key("hello")
    assert cache.get(key) is None and key not in cache
    cache.put(key, {"e": torch.arange(6.0).reshape(2, 3)})
    assert key in cache and torch.equal(cache.get(key)["e"], torch.arange(6.0).reshape(2, 3))
    assert cache.text_key("hello") != D.EncodingCache(tmp_path, "enc2").text_key("hello")
    ds = D.CachedDataset(cache, [{"caption": "x", "text": "0" * 64}], roles=())
    with pytest.raises(InputError, match="lacks entry"):
        ds[0]


def test_cache_works_for_captioned_folders(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_image_bytes(16, 16, i % 2))  # images 0 and 2 are identical
        (root / f"{i}.txt").write_text("same caption")
    ds = D.CaptionedImageFolder(root, 16)
    enc = CountingEncoders()
    cached = D.fill_cache(ds, D.EncodingCache(tmp_path / "c", "e"), encode_images=enc.encode_images,
                          encode_captions=enc.encode_captions)
    assert enc.images == 2 and enc.captions == ["same caption"]  # content-keyed: duplicates encode once
    assert torch.equal(cached[0]["image"]["mean"], cached[2]["image"]["mean"])


# --------------------------------------------------------------------------------------------
# Block-wise order for parquet row groups
# --------------------------------------------------------------------------------------------


def test_block_ids_follow_parquet_row_groups(parquet_dir):
    ds = D.PairDataset(D.open_pickapic(parquet_dir), 16, ties="jpg_0")
    # 5 rows written with row_group_size=2: groups {0, 1}, {2, 3}, {4}
    assert ds.block_ids() == [0, 0, 1, 1, 2]
    dropped = D.PairDataset(D.open_pickapic(parquet_dir), 16)  # rows 0, 1, 3 remain
    assert dropped.block_ids() == [0, 0, 1]


def test_blockwise_order_keeps_blocks_together_and_shuffles():
    blocks = [0, 0, 0, 1, 1, 2, 2, 2, 2, 5]
    orders = [D.blockwise_order(blocks, seed=s, epoch=e) for s in range(4) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(10))
        seen = [blocks[i] for i in order]
        runs = [b for k, b in enumerate(seen) if k == 0 or seen[k - 1] != b]
        assert sorted(runs) == [0, 1, 2, 5]  # each block visited in one contiguous run
    assert len({tuple(o) for o in orders}) > 6
    assert D.blockwise_order(blocks, seed=1, epoch=2) == D.blockwise_order(blocks, seed=1, epoch=2)


def test_corrupt_parquet_is_a_format_error(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(FormatError, match="x.parquet: not a readable parquet file"):
        D.open_pickapic(tmp_path / "x.parquet")
