"""The process-wide decoded-image cache: datasets built one after the other (a study worker's trials) decode each
image once; a rewritten file is decoded again; the byte budget evicts least-recently-used images."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from maskssd.data import dataset as dataset_module
from maskssd.data import load_split
from maskssd.data.dataset import FaceMaskDataset
from maskssd.data.image_cache import ImageCache, shared_image_cache


def _decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = dataset_module.load_image

    def counting(path, *a, **k):
        calls.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(dataset_module, "load_image", counting)
    return calls


def test_datasets_of_one_process_share_decoded_images(make_dataset, good_sample, monkeypatch):
    ids = [f"img{i}" for i in range(3)]
    root = make_dataset({i: good_sample(i, seed=n) for n, i in enumerate(ids)}, {"train": ids})
    anns = load_split(root, "train", "test_split")
    shared_image_cache().clear()
    calls = _decodes(monkeypatch)
    first = FaceMaskDataset(anns, cache_images=True)
    images = [first.raw_sample(i)["image"] for i in range(3)]
    assert len(calls) == 3
    second = FaceMaskDataset(anns, cache_images=True)  # the next trial's dataset
    again = [second.raw_sample(i)["image"] for i in range(3)]
    assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(images, again))

    path = anns[1].image_path  # rewritten: decoded again, with its new content
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fresh = second.raw_sample(1)["image"]
    assert len(calls) == 4 and int(fresh.sum()) == 0 and not torch.equal(fresh, images[1])

    FaceMaskDataset(anns, cache_images=False).raw_sample(0)  # no cache: decoded every time
    assert len(calls) == 5
    stats = shared_image_cache().stats()
    assert stats.hits == 3 and stats.misses == 4


def test_cache_evicts_least_recently_used_beyond_its_budget(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(b"x")  # only stat() is read: decoding is the callable's job
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)  # 48 bytes
    cache = ImageCache(max_bytes=2 * 48)
    decoded: list[int] = []

    def decode(i: int):
        decoded.append(i)
        return img.clone()

    cache.get(paths[0], 1, lambda: decode(0))
    cache.get(paths[1], 1, lambda: decode(1))
    cache.get(paths[0], 1, lambda: decode(0))  # 0 is now the most recent
    cache.get(paths[2], 1, lambda: decode(2))  # evicts 1
    cache.get(paths[0], 1, lambda: decode(0))
    cache.get(paths[1], 1, lambda: decode(1))
    assert decoded == [0, 1, 2, 1] and cache.stats().entries == 2 and cache.stats().bytes == 96
