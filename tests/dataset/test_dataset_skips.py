"""A sample whose image fails to load is left out for the rest of the epoch only, and the skips of DataLoader
workers add up in the dataset's count."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from dataset import DataCollator, NoUsableSampleError
from tests.dataset.test_dataset import EOD, TAG, grey_of, make_dataset, sample, save_image, write_jsonl


def test_a_transient_read_error_is_retried_next_epoch(tmp_path, tok_tiny):
    images = [save_image(tmp_path / f"{g}.png", g) for g in (10, 20, 30)]
    path = write_jsonl(tmp_path / "train.jsonl",
                       [sample(f"s{i}", [img], f"{TAG} a", "b") for i, img in enumerate(images)])
    ds = make_dataset(path, tok_tiny)
    flaky = tmp_path / "20.png"
    content = flaky.read_bytes()
    flaky.unlink()  # e.g. a network file system that fails for a moment
    assert grey_of(ds[1]["pixel_values"]) == 30 and ds.skipped == 1  # the next sample instead
    flaky.write_bytes(content)
    assert grey_of(ds[1]["pixel_values"]) == 30 and ds.skipped == 1  # out for the rest of this epoch, not recounted
    ds.set_epoch(1)
    assert grey_of(ds[1]["pixel_values"]) == 20 and ds.skipped == 1  # tried again in the next one


@pytest.mark.parametrize("persistent", [False, True])
def test_skips_of_dataloader_workers_add_up(tmp_path, tok_tiny, persistent):
    good = save_image(tmp_path / "good.png", 50)
    bad = {1, 4, 6}  # each followed by a good sample: every skip is a sample some worker was asked for
    path = write_jsonl(tmp_path / "train.jsonl", [
        sample(f"s{i}", [str(tmp_path / f"missing-{i}.png") if i in bad else good], f"{TAG} a", "b") for i in range(8)])
    ds = make_dataset(path, tok_tiny)
    loader = DataLoader(ds, batch_size=2, collate_fn=DataCollator(EOD), num_workers=2, persistent_workers=persistent)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert sum(len(batch["input_ids"]) for batch in loader) == 8
        assert ds.skipped == len(bad) * (epoch + 1)  # counted in the workers, seen here; again in the next epoch


def test_a_file_whose_images_all_fail_is_a_clear_error(tmp_path, tok_tiny):
    path = write_jsonl(tmp_path / "train.jsonl", [
        sample(f"s{i}", [str(tmp_path / f"missing-{i}.png")], f"{TAG} a", "b") for i in range(3)])
    ds = make_dataset(path, tok_tiny)
    with pytest.raises(NoUsableSampleError, match="train.jsonl: no sample could be loaded"):
        ds[0]
