"""Image sources: directories, archives and manifests, decoded once into one uint8 tensor."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine.errors import ImageSourceError, UnlearningCancelled
from worker.engine.images import ImageSet, ReadLimits, list_images, normalise, read_images, source_path
from worker.engine.package import InputSpec

RGB = InputSpec(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channels="RGB")
GREY = InputSpec(size=(8, 8), mean=(0.5,), std=(0.25,), channels="L")


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 8), colour=(10, 20, 30), mode: str = "RGB") -> bytes:
    """A solid image of ``size`` (width, height) encoded as ``fmt``."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def names(source) -> list[str]:
    return [Path(entry.name).name for entry in list_images(str(source))]


# --- directories -------------------------------------------------------------------------------


def test_a_directory_source_is_searched_recursively_and_labelled_by_parent_folder(tmp_path):
    write(tmp_path / "src" / "test" / "cat" / "0001.png", image_bytes())
    write(tmp_path / "src" / "dog" / "0001.png", image_bytes())
    write(tmp_path / "src" / "cat" / "0002.png", image_bytes())
    images = read_images(str(tmp_path / "src"), RGB)
    assert images.labels == ("cat", "dog", "cat")  # sorted by path: cat/, dog/, test/cat/
    assert len(images) == 3


def test_a_directory_is_listed_in_sorted_stable_order(tmp_path):
    for name in ("b.png", "a.png", "c/z.png", "c/a.png"):
        write(tmp_path / "src" / name, image_bytes())
    assert names(tmp_path / "src") == ["a.png", "b.png", "a.png", "z.png"]
    assert names(tmp_path / "src") == names(tmp_path / "src")


def test_a_file_directly_in_the_source_folder_takes_the_folder_name_as_label(tmp_path):
    write(tmp_path / "horse" / "0001.png", image_bytes())
    assert read_images(str(tmp_path / "horse"), RGB).labels == ("horse",)


def test_hidden_files_and_folders_are_ignored(tmp_path):
    write(tmp_path / "src" / "cat" / "0001.png", image_bytes())
    write(tmp_path / "src" / "cat" / ".0002.png", image_bytes())
    write(tmp_path / "src" / ".cache" / "dog" / "0001.png", image_bytes())
    write(tmp_path / "src" / "cat" / ".DS_Store", b"not an image")
    images = read_images(str(tmp_path / "src"), RGB)
    assert images.labels == ("cat",)
    assert images.skipped == ()


# --- archives ----------------------------------------------------------------------------------


@pytest.mark.parametrize("archive_name", ["images.tar", "images.tar.gz", "images.tgz"])
def test_an_archive_is_read_in_place_and_labelled_by_member_parent_folder(tmp_path, archive_name):
    archive = write_tar(tmp_path / archive_name, {
        "test/cat/0001.png": image_bytes(),
        "dog/0001.png": image_bytes(),
        "./.hidden/bird/0001.png": image_bytes(),
    })
    images = read_images(str(archive), RGB)
    assert images.labels == ("cat", "dog")
    assert images.pixels.shape == (2, 3, 8, 8)


def test_a_corrupt_archive_is_refused(tmp_path):
    archive = write(tmp_path / "broken.tar.gz", b"\x1f\x8b not really gzip")
    with pytest.raises(ImageSourceError, match="broken.tar.gz"):
        read_images(str(archive), RGB)


# --- manifests ---------------------------------------------------------------------------------


def test_a_csv_manifest_gives_paths_relative_to_itself_and_its_labels(tmp_path):
    write(tmp_path / "data" / "x" / "1.png", image_bytes())
    write(tmp_path / "data" / "y" / "2.png", image_bytes())
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text("path,label\nx/1.png,cat\ny/2.png,\n")
    images = read_images(str(manifest), RGB)
    assert images.labels == ("cat", "y")  # an empty label falls back to the parent folder


def test_a_jsonl_manifest_without_labels_uses_the_parent_folder(tmp_path):
    write(tmp_path / "data" / "cat" / "1.png", image_bytes())
    write(tmp_path / "data" / "dog" / "2.png", image_bytes())
    manifest = tmp_path / "data" / "list.jsonl"
    manifest.write_text('{"path": "dog/2.png"}\n\n{"path": "cat/1.png", "label": "kitten"}\n')
    assert read_images(str(manifest), RGB).labels == ("dog", "kitten")


def test_a_csv_manifest_without_a_path_column_is_refused_naming_the_manifest(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,label\n1.png,cat\n")
    with pytest.raises(ImageSourceError, match=r"list\.csv: manifest has no 'path' column"):
        read_images(str(manifest), RGB)


def test_a_jsonl_row_without_a_path_is_refused_naming_the_manifest_and_line(tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"label": "cat"}\n')
    with pytest.raises(ImageSourceError, match=r"list\.jsonl:1: row has no 'path'"):
        read_images(str(manifest), RGB)


@pytest.mark.parametrize("manifest_name, content", [
    ("list.csv", "path,label\nmissing.png,cat\n"),
    ("list.jsonl", '{"path": "missing.png"}\n'),
])
def test_a_manifest_row_pointing_at_a_missing_image_is_refused(tmp_path, manifest_name, content):
    manifest = tmp_path / manifest_name
    manifest.write_text(content)
    with pytest.raises(ImageSourceError, match=rf"{manifest_name}:\d+: image 'missing.png' not found"):
        read_images(str(manifest), RGB)


@pytest.mark.parametrize("line", ["{not json", "[1, 2]"])
def test_a_malformed_jsonl_line_is_refused_naming_the_manifest_and_line(tmp_path, line):
    write(tmp_path / "cat" / "1.png", image_bytes())
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"path": "cat/1.png"}\n' + line + "\n")
    with pytest.raises(ImageSourceError, match=r"list\.jsonl:2: not a JSON object"):
        read_images(str(manifest), RGB)


# --- source URIs -------------------------------------------------------------------------------


def test_a_file_uri_reads_the_same_images_as_the_plain_path(tmp_path):
    write(tmp_path / "src" / "cat" / "1.png", image_bytes())
    uri = (tmp_path / "src").as_uri()
    assert uri.startswith("file://")
    assert source_path(uri) == tmp_path / "src"
    assert read_images(uri, RGB).labels == read_images(str(tmp_path / "src"), RGB).labels == ("cat",)


def test_a_plain_path_is_returned_as_it_is():
    assert source_path("data/forget") == Path("data/forget")


@pytest.mark.parametrize("uri, scheme", [("s3://b/k", "s3"), ("http://x", "http"), ("gs://bucket/images", "gs")])
def test_remote_schemes_are_refused(uri, scheme):
    with pytest.raises(ImageSourceError, match=f"unsupported image source scheme '{scheme}'"):
        source_path(uri)
    with pytest.raises(ImageSourceError):
        read_images(uri, RGB)


def test_a_file_uri_naming_a_remote_host_is_refused():
    with pytest.raises(ImageSourceError, match="must name a local path"):
        source_path("file://server/share/images")


# --- missing, empty and bad sources ------------------------------------------------------------


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(ImageSourceError, match="no such file or directory"):
        read_images(str(tmp_path / "nope"), RGB)


def test_an_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="no images found"):
        read_images(str(tmp_path / "empty"), RGB)


def test_a_directory_with_only_hidden_files_is_refused(tmp_path):
    write(tmp_path / "src" / ".a.png", image_bytes())
    write(tmp_path / "src" / ".git" / "cat" / "b.png", image_bytes())
    with pytest.raises(ImageSourceError, match="no images found"):
        read_images(str(tmp_path / "src"), RGB)


def test_a_file_that_is_not_a_directory_archive_or_manifest_is_refused(tmp_path):
    single = write(tmp_path / "one.png", image_bytes())
    with pytest.raises(ImageSourceError, match="not a directory, a .tar/.tar.gz archive or a .csv/.jsonl manifest"):
        read_images(str(single), RGB)


@pytest.mark.parametrize("bad_name, data", [
    ("notes.txt", b"hello, not an image"),
    ("broken.jpg", image_bytes("JPEG")[:40]),  # truncated JPEG
    ("anim.gif", image_bytes("GIF", mode="P", colour=1)),  # a real image, but not a supported format
])
def test_an_undecodable_file_fails_the_read_naming_the_file(tmp_path, bad_name, data):
    write(tmp_path / "src" / "cat" / "good.png", image_bytes())
    write(tmp_path / "src" / "cat" / bad_name, data)
    with pytest.raises(ImageSourceError, match=rf"{bad_name}: not a decodable JPEG/PNG/BMP/PGM/WebP image"):
        read_images(str(tmp_path / "src"), RGB)


def test_with_skip_bad_undecodable_files_are_skipped_and_listed(tmp_path):
    write(tmp_path / "src" / "cat" / "a.png", image_bytes())
    write(tmp_path / "src" / "cat" / "b.txt", b"not an image")
    write(tmp_path / "src" / "dog" / "c.jpg", image_bytes("JPEG")[:40])
    write(tmp_path / "src" / "dog" / "d.png", image_bytes())
    images = read_images(str(tmp_path / "src"), RGB, skip_bad=True)
    assert images.labels == ("cat", "dog")
    assert len(images) == 2
    assert [Path(name).name for name in images.skipped] == ["b.txt", "c.jpg"]


def test_with_skip_bad_a_source_of_only_bad_files_still_fails(tmp_path):
    write(tmp_path / "src" / "cat" / "a.txt", b"no")
    write(tmp_path / "src" / "cat" / "b.txt", b"nope")
    with pytest.raises(ImageSourceError, match=r"no images found \(2 undecodable file\(s\) skipped\)"):
        read_images(str(tmp_path / "src"), RGB, skip_bad=True)


def test_an_undecodable_archive_member_is_named_with_the_archive(tmp_path):
    archive = write_tar(tmp_path / "images.tar", {"cat/ok.png": image_bytes(), "cat/bad.png": b"garbage"})
    with pytest.raises(ImageSourceError, match=r"images\.tar:cat/bad\.png: not a decodable"):
        read_images(str(archive), RGB)


# --- formats, channels and size ----------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix, mode, colour", [
    ("JPEG", "jpg", "RGB", (200, 100, 50)),
    ("PNG", "png", "RGB", (200, 100, 50)),
    ("BMP", "bmp", "RGB", (200, 100, 50)),
    ("PPM", "pgm", "L", 120),  # Pillow writes a PGM for a greyscale image
    ("WEBP", "webp", "RGB", (200, 100, 50)),
])
def test_every_supported_format_decodes(tmp_path, fmt, suffix, mode, colour):
    write(tmp_path / "src" / "cat" / f"1.{suffix}", image_bytes(fmt, size=(8, 8), colour=colour, mode=mode))
    images = read_images(str(tmp_path / "src"), RGB)
    assert images.pixels.shape == (1, 3, 8, 8)
    assert images.pixels.dtype == torch.uint8
    assert images.labels == ("cat",)


def test_a_pgm_file_is_really_a_pgm(tmp_path):
    assert image_bytes("PPM", mode="L", colour=120).startswith(b"P5")  # guards the format test above


@pytest.mark.parametrize("spec, channels", [(RGB, 3), (GREY, 1)])
def test_images_are_converted_to_the_spec_channels_and_resized_to_its_size(tmp_path, spec, channels):
    write(tmp_path / "src" / "cat" / "wide.png", image_bytes(size=(20, 5)))
    write(tmp_path / "src" / "cat" / "grey.png", image_bytes(size=(3, 3), mode="L", colour=7))
    write(tmp_path / "src" / "cat" / "rgba.png", image_bytes(size=(8, 8), mode="RGBA", colour=(1, 2, 3, 4)))
    tall = InputSpec(size=(6, 4), mean=spec.mean, std=spec.std, channels=spec.channels)  # (height, width)
    images = read_images(str(tmp_path / "src"), tall)
    assert images.pixels.shape == (3, channels, 6, 4)
    assert images.pixels.dtype == torch.uint8
    assert images.pixels.is_contiguous()


def test_pixel_values_of_a_lossless_image_already_at_size_survive(tmp_path):
    array = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)  # (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG")
    write(tmp_path / "src" / "cat" / "1.png", buffer.getvalue())
    pixels = read_images(str(tmp_path / "src"), RGB).pixels
    assert torch.equal(pixels[0], torch.from_numpy(array).permute(2, 0, 1))
    assert pixels[0, :, 2, 5].tolist() == array[2, 5].tolist()


def test_a_colour_image_becomes_its_luminance_in_grey_mode(tmp_path):
    write(tmp_path / "src" / "cat" / "1.png", image_bytes(colour=(255, 0, 0)))
    pixels = read_images(str(tmp_path / "src"), GREY).pixels
    assert pixels.shape == (1, 1, 8, 8)
    assert pixels.unique().tolist() == [76]  # Pillow's L = R * 299/1000 + G * 587/1000 + B * 114/1000


# --- labels to class indices -------------------------------------------------------------------


def test_label_indices_map_labels_to_class_positions(tmp_path):
    for label in ("cat", "dog", "bird"):
        write(tmp_path / "src" / label / "1.png", image_bytes())
    images = read_images(str(tmp_path / "src"), RGB)  # sorted: bird, cat, dog
    indices = images.label_indices(("dog", "cat", "bird"))
    assert indices.tolist() == [2, 1, 0]
    assert indices.dtype == torch.long


def test_label_indices_refuse_labels_the_model_does_not_know_listing_them(tmp_path):
    for label in ("cat", "zebra", "yak"):
        write(tmp_path / "src" / label / "1.png", image_bytes())
    images = read_images(str(tmp_path / "src"), RGB)
    with pytest.raises(ImageSourceError, match="labels not among the model's classes: yak, zebra"):
        images.label_indices(("cat", "dog"))


def test_label_indices_refuse_unlabelled_images(tmp_path):
    archive = write_tar(tmp_path / "flat.tar", {"root.png": image_bytes(), "cat/1.png": image_bytes()})
    images = read_images(str(archive), RGB)
    assert images.labels == (None, "cat")
    with pytest.raises(ImageSourceError, match=r"1 image\(s\) have no label"):
        images.label_indices(("cat",))


# --- normalisation -----------------------------------------------------------------------------


def test_normalise_scales_to_unit_range_then_standardises_each_channel():
    spec = InputSpec(size=(1, 2), mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25), channels="RGB")
    pixels = torch.tensor([[[[0, 255]], [[0, 255]], [[0, 255]]]], dtype=torch.uint8)  # (1, 3, 1, 2)
    out = normalise(pixels, spec)
    assert out.dtype == torch.float32
    assert out.shape == (1, 3, 1, 2)
    expected = torch.tensor([[[[0.0, 1.0]], [[-1.0, 1.0]], [[-4.0, 0.0]]]])
    assert torch.allclose(out, expected)


def test_normalise_matches_the_formula_on_arbitrary_values():
    pixels = torch.tensor([[[[51, 102]]]], dtype=torch.uint8)  # 0.2, 0.4
    out = normalise(pixels, InputSpec(size=(1, 2), mean=(0.5,), std=(0.25,), channels="L"))
    assert torch.allclose(out, torch.tensor([[[[-1.2, -0.4]]]]))


def test_an_image_set_length_is_its_number_of_images():
    images = ImageSet(source="x", pixels=torch.zeros(4, 1, 2, 2, dtype=torch.uint8), labels=("a",) * 4, skipped=())
    assert len(images) == 4


def test_a_csv_manifest_saved_with_a_byte_order_mark_is_read(tmp_path):
    write(tmp_path / "cat" / "1.png", image_bytes())
    (tmp_path / "m.csv").write_text("\ufeffpath,label\ncat/1.png,dog\n", encoding="utf-8")
    assert read_images(str(tmp_path / "m.csv"), RGB).labels == ("dog",)


def test_files_in_a_relative_source_folder_take_its_name(tmp_path, monkeypatch):
    write(tmp_path / "cat" / "1.png", image_bytes())
    monkeypatch.chdir(tmp_path / "cat")
    assert read_images(".", RGB).labels == ("cat",)


def test_a_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    pixels = np.full((8, 8), 32768, dtype=np.uint16)
    folder = tmp_path / "cat"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "1.png")
    assert read_images(str(folder), GREY).pixels.unique().tolist() == [128]


def test_manifest_rows_may_not_leave_the_manifest_folder(tmp_path):
    write(tmp_path / "outside" / "1.png", image_bytes())
    (tmp_path / "set").mkdir()
    for row in (str(tmp_path / "outside" / "1.png"), "../outside/1.png"):
        (tmp_path / "set" / "m.csv").write_text(f"path\n{row}\n")
        with pytest.raises(ImageSourceError, match="outside the manifest's folder"):
            read_images(str(tmp_path / "set" / "m.csv"), RGB)


def test_a_directory_source_may_not_link_outside_itself(tmp_path):
    write(tmp_path / "outside" / "1.png", image_bytes())
    (tmp_path / "set" / "cat").mkdir(parents=True)
    (tmp_path / "set" / "cat" / "1.png").symlink_to(tmp_path / "outside" / "1.png")
    with pytest.raises(ImageSourceError, match="links outside the source folder"):
        read_images(str(tmp_path / "set"), RGB)


# --- limits: what one source may hold, and files that are not files --------------------------------------------------

def test_a_fifo_named_like_an_archive_is_refused_at_once_not_waited_on(tmp_path):
    fifo = tmp_path / "forget.tar"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer that never comes
    with pytest.raises(ImageSourceError, match="not a regular file"):
        read_images(str(fifo), RGB)


def test_a_fifo_listed_in_a_manifest_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "a.png")
    write(tmp_path / "set.csv", b"path,label\na.png,cat\n")
    with pytest.raises(ImageSourceError, match="not found"):
        read_images(str(tmp_path / "set.csv"), RGB)


def test_an_archive_member_larger_than_the_limit_is_refused_before_it_is_inflated(tmp_path):
    archive = write_tar(tmp_path / "bomb.tar.gz", {"cat/big.png": bytes(4 * 1024**2)})  # 4 MB of zeros: a few KB
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(ImageSourceError, match="bytes, more than the 1048576 an image may have"):
        read_images(str(archive), RGB, limits=ReadLimits(max_image_bytes=1024**2))


def test_an_image_file_larger_than_the_limit_is_refused(tmp_path):
    write(tmp_path / "cat" / "big.png", image_bytes(size=(64, 64)))
    with pytest.raises(ImageSourceError, match="an image may have"):
        read_images(str(tmp_path), RGB, limits=ReadLimits(max_image_bytes=50))


@pytest.mark.parametrize(("limits", "message"), [
    (ReadLimits(max_images=2), "more than 2 images"),
    (ReadLimits(max_source_bytes=2 * len(image_bytes())), "bytes of images"),
    (ReadLimits(max_pixels=2 * 8 * 8), "pixels of images"),
], ids=["images", "bytes", "pixels"])
def test_a_source_past_a_limit_is_refused(tmp_path, limits, message):
    for i in range(3):
        write(tmp_path / "cat" / f"{i}.png", image_bytes(colour=(i, 0, 0)))
    assert len(read_images(str(tmp_path), RGB)) == 3
    with pytest.raises(ImageSourceError, match=message):
        read_images(str(tmp_path), RGB, limits=limits)
    archive = write_tar(tmp_path.parent / f"{tmp_path.name}.tar", {f"cat/{i}.png": image_bytes(colour=(i, 0, 0))
                                                                   for i in range(3)})
    with pytest.raises(ImageSourceError, match=message):
        read_images(str(archive), RGB, limits=limits)


def test_a_read_stops_between_images_when_asked(tmp_path):
    for i in range(3):
        write(tmp_path / "cat" / f"{i}.png", image_bytes(colour=(i, 0, 0)))
    asked = []

    def stop_after_two() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(UnlearningCancelled, match="stopped while reading"):
        read_images(str(tmp_path), RGB, should_stop=stop_after_two)
    assert len(asked) == 3


def test_a_file_opened_outside_the_allowed_roots_is_refused_whatever_its_path_said(tmp_path):
    # A link swapped after a caller checked the path: the check made on the open file still refuses.
    allowed, outside = tmp_path / "roots" / "set" / "cat", tmp_path / "outside"
    write(allowed / "0.png", image_bytes())
    write(allowed / "inside.png", image_bytes(colour=(4, 5, 6)))
    write(outside / "1.png", image_bytes(colour=(1, 2, 3)))
    (allowed / "1.png").symlink_to(allowed / "inside.png")  # inside when the source is listed ...
    within = ReadLimits(within=(str((tmp_path / "roots").resolve()),))
    entries = list(list_images(str(tmp_path / "roots" / "set"), within))
    (allowed / "1.png").unlink()
    (allowed / "1.png").symlink_to(outside / "1.png")  # ... swapped before it is read
    with pytest.raises(ImageSourceError, match="leads outside the allowed data roots"):
        for entry in entries:
            entry.read_bytes()
    manifest = write(tmp_path / "roots" / "list.csv", b"path,label\nset/cat/0.png,cat\n")
    assert len(read_images(str(manifest), RGB, limits=within)) == 1
    (tmp_path / "roots" / "swapped.csv").symlink_to(outside / "1.png")
    with pytest.raises(ImageSourceError, match="leads outside the allowed data roots"):
        read_images(str(tmp_path / "roots" / "swapped.csv"), RGB, limits=within)


def test_an_image_with_more_pixels_than_allowed_is_refused_before_it_is_decoded(tmp_path):
    write(tmp_path / "cat" / "huge.png", image_bytes(size=(300, 200)))  # a few hundred bytes of PNG
    with pytest.raises(ImageSourceError, match="60000 pixels, more than the 50000 an image may have"):
        read_images(str(tmp_path), RGB, limits=ReadLimits(max_image_pixels=50_000))
