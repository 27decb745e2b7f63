"""``gramstyle batch``: many content images, one style setup, one output folder -- in-process
(model and style targets built once) and against a server with --parallel."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import noise, png
from PIL import Image

from gramstyle.cli import batch, main

#: The conftest ``server`` with two workers, so that --parallel 2 runs two at once.
SERVER_SETTINGS = {"workers": 2, "queue_size": 2}
TINY = ["--size", "32", "--iterations", "1", "-q"]


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three 48x40 content images, a file that is not an image, and a text file to ignore."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(png(noise(48, 40, seed=100 + i)))
    (folder / "bad.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either")
    return folder


@pytest.fixture
def style(tmp_path) -> Path:
    path = tmp_path / "style.png"
    # A seed no other test uses: its targets are not in the shared engine's cache yet.
    path.write_bytes(png(noise(40, 40, seed=20_261_206)))
    return path


class Lookups:
    """Records every target-cache lookup of an engine: (kind, hit)."""

    def __init__(self, monkeypatch, engine):
        self.seen: list[tuple[str, bool]] = []
        cache = engine.target_cache
        real = cache.get

        def get(key):
            found = real(key)
            self.seen.append((key[0], found is not None))
            return found

        monkeypatch.setattr(cache, "get", get)

    def count(self, kind: str, hit: bool) -> int:
        return self.seen.count((kind, hit))


def test_folder_in_process_builds_model_and_style_targets_once(
        photos, style, tmp_path, random_engine, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(batch, "load_engine", lambda args: loads.append(args) or random_engine)
    lookups = Lookups(monkeypatch, random_engine)
    out = tmp_path / "out"
    code = batch_main([str(photos), "--style", str(style), "-o", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 1  # one image failed
    assert len(loads) == 1
    # One style image, one scale: computed for the first image, found for the other two.
    assert lookups.count("style", hit=False) == 1 and lookups.count("style", hit=True) == 2
    assert lookups.count("content", hit=False) == 3
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p1.png", "p2.png"]
    for i in range(3):
        with Image.open(out / f"p{i}.png") as image:
            assert image.format == "PNG" and image.size == (32, 27)
    assert f"gramstyle: error: {photos / 'bad.png'}: cannot decode image" in captured.err
    assert f"batch: 3 ok, 1 failed, 0 skipped of 4 images in {out}" in captured.out


def batch_main(args: list[str]) -> int:
    return main(["batch", *args])


def test_skip_existing_resumes_and_files_and_globs_mix(photos, style, tmp_path, random_engine,
                                                       monkeypatch, capsys):
    monkeypatch.setattr(batch, "load_engine", lambda args: random_engine)
    out = tmp_path / "out"
    out.mkdir()
    done = png(noise(8, 8, seed=5))
    (out / "p0.jpg").write_bytes(done)  # "an earlier run" wrote p0
    code = batch_main([str(photos / "p0.png"), str(photos / "p[12].png"), "--style", str(style),
                       "-o", str(out), "--format", "jpg", "--skip-existing", *TINY])
    assert code == 0, capsys.readouterr().err
    assert "batch: 2 ok, 0 failed, 1 skipped of 3 images" in capsys.readouterr().out
    assert (out / "p0.jpg").read_bytes() == done  # left alone
    for name in ("p1.jpg", "p2.jpg"):
        with Image.open(out / name) as image:
            assert image.format == "JPEG" and image.size == (32, 27)
    # Without --skip-existing, an existing output is replaced.
    code = batch_main([str(photos / "p0.png"), "--style", str(style), "-o", str(out),
                       "--format", "jpg", *TINY])
    assert code == 0, capsys.readouterr().err
    with Image.open(out / "p0.jpg") as image:
        assert image.size == (32, 27)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("case, message", [
    ("missing", "CONTENT: no such file or folder"),
    ("empty", "CONTENT: no images"),
    ("glob", "CONTENT: no images match"),
    ("clash", "would both be written to"),
    ("in-place", "would replace the content image"),
    ("parallel", "--parallel: applies to calls to --server"),
    ("timeout", "--timeout: is the deadline of a call to --server"),
    ("preset", "--preset: must be one of faithful, balanced, painterly, got 'loud'"),
    ("style", "--style #1: cannot decode image"),
])
def test_whole_batch_mistakes_exit_2_before_anything_runs(case, message, photos, style,
                                                          tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(batch, "load_engine", lambda args: pytest.fail("loaded a model"))
    out = tmp_path / "out"
    inputs, extra = [str(photos)], []
    if case == "missing":
        inputs = [str(tmp_path / "nope")]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        inputs = [str(tmp_path / "empty")]
    elif case == "glob":
        inputs = [str(photos / "*.webp")]
    elif case == "clash":
        other = tmp_path / "other"
        other.mkdir()
        (other / "p0.jpg").write_bytes(png(noise(8, 8)))
        inputs = [str(photos), str(other / "p0.jpg")]
    elif case == "in-place":
        out = photos
    elif case == "parallel":
        extra = ["--parallel", "2"]
    elif case == "timeout":
        extra = ["--timeout", "5"]
    elif case == "preset":
        extra = ["--preset", "loud"]
    elif case == "style":
        style = photos / "bad.png"
    code = batch_main([*inputs, "--style", str(style), "-o", str(out), *TINY, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert case == "in-place" or not out.exists()


def test_folder_against_a_server_in_parallel(server, photos, tmp_path, random_engine,
                                             monkeypatch, capsys):
    style = tmp_path / "style.png"  # not the other tests' style: not in the cache yet
    style.write_bytes(png(noise(40, 40, seed=20_261_207)))
    lookups = Lookups(monkeypatch, random_engine)
    out = tmp_path / "out"
    code = batch_main([str(photos), "--style", str(style), "-o", str(out), "--server",
                       f"127.0.0.1:{server.port}", "--parallel", "2", "--timeout", "120",
                       "--preset", "balanced", *TINY])
    captured = capsys.readouterr()
    assert code == 1
    assert f"{photos / 'bad.png'}: server answered INVALID_ARGUMENT: cannot decode image" \
        in captured.err
    assert "batch: 3 ok, 1 failed, 0 skipped of 4 images" in captured.out
    for i in range(3):
        with Image.open(out / f"p{i}.png") as image:
            assert image.size == (32, 27)
    # The server's cache keeps the style targets: two calls in flight may both miss at once
    # (see engine/target_cache.py), the rest find them.
    misses = lookups.count("style", hit=False)
    assert 1 <= misses <= 2 and misses + lookups.count("style", hit=True) == 3


def test_unreachable_server_fails_the_batch_once(photos, style, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = batch_main([str(photos), "--style", str(style), "-o", str(tmp_path / "out"),
                       "--server", f"127.0.0.1:{port}", "--timeout", "10", "--retries", "0",
                       *TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("server answered UNAVAILABLE") == 1
    assert not (tmp_path / "out").exists()
