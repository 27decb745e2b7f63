"""The CLI over the network: stylize/info/losses with --server, exit codes for server errors,
and `gramstyle serve` flag checks. The server runs in this process on a loopback port."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from gramstyle.cli import main
from gramstyle.server.serve import GramstyleServer, ServeConfig


@pytest.fixture(scope="module")
def target(random_engine):
    srv = GramstyleServer([random_engine], ServeConfig(host="127.0.0.1", port=0, workers=1,
                                                       queue_size=2)).start()
    yield f"127.0.0.1:{srv.port}"
    srv.stop(grace=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stylize_remote_writes_output_frames_and_sheet(target, images, tmp_path, capsys,
                                                       monkeypatch):
    from gramstyle.cli import progress_sheet

    drawn = []
    draw = progress_sheet.draw_progress_sheet
    monkeypatch.setattr(progress_sheet, "draw_progress_sheet",
                        lambda frames, *a, **k: drawn.append(list(frames)) or draw(frames, *a, **k))
    out = tmp_path / "out.jpg"
    code = main(["stylize", "--server", target, "--content", str(images["cat"]), "--style",
                 str(images["starry"]), "--size", "48", "--iterations", "6",
                 "--progress-every", "2", "--save-every", "3", "-o", str(out),
                 "--progress-sheet", str(tmp_path / "sheet.png"), "--timeout", "120"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (48, 32)
    assert Image.open(tmp_path / "out_0003.jpg").size == (48, 32)
    assert not (tmp_path / "out_0006.jpg").exists()  # the last one is the output itself
    sheet = Image.open(tmp_path / "sheet.png")
    # Frames 0, 2, 4, 6 plus the content image, each in a 192 px tile, 8 px apart.
    assert sheet.width == 5 * 192 + 6 * 8
    (frames,) = drawn
    assert [label for label, _ in frames] == ["iteration 0", "iteration 2", "iteration 4",
                                              "iteration 6", "content"]
    assert [image.size for _, image in frames[:4]] == [(48, 32)] * 4
    assert f"wrote {out} (48x32) after 6 iterations" in captured.out
    assert "6/6" in captured.err  # the tqdm bar reached the end


@pytest.mark.parametrize("args,code,message", [
    # A bad file is caught by the CLI before anything is sent.
    (["--content", "BAD"], 2, "--content #1: cannot decode image"),
    (["--weights", "imagenet"], 2,
     "server answered FAILED_PRECONDITION: weights: model */imagenet is not loaded"),
    (["--style-layers", "relu9_1"], 2,
     "server answered INVALID_ARGUMENT: style_layers: unknown layer 'relu9_1'"),
    (["--device", "cpu"], 2, "--device: is chosen when the server starts"),
    (["--iterations", "0"], 2, "--iterations: must be between 1 and"),
])
def test_stylize_remote_errors(target, images, tmp_path, capsys, args, code, message):
    if args[:2] == ["--content", "BAD"]:
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png")
        args = ["--content", str(bad)]
    else:
        args = ["--content", str(images["cat"]), *args]
    result = main(["stylize", "--server", target, "--style", str(images["starry"]), "--size",
                   "32", "--iterations", "2", "-q", "-o", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert result == code, err
    assert message in err
    assert not (tmp_path / "o.png").exists()


def test_unreachable_server_exits_1(images, tmp_path, capsys):
    code = main(["info", "--server", f"127.0.0.1:{free_port()}", "--timeout", "10"])
    err = capsys.readouterr().err
    assert code == 1 and "server answered UNAVAILABLE" in err
    assert main(["info", "--server", "nohostport"]) == 2
    assert "--server: expected HOST:PORT" in capsys.readouterr().err


def test_info_remote(target, capsys):
    assert main(["info", "--server", target]) == 0
    out = capsys.readouterr().out
    assert f"server    {target}" in out
    assert "model     vgg19/random, max pooling, 37 layers (default)" in out
    assert "workers   0/1 busy, 0/2 queued" in out


def test_losses_remote_matches_local(target, images, tmp_path, capsys):
    common = [str(images["coffee"]), "--content", str(images["cat"]), "--style",
              str(images["starry"]), "--arch", "vgg19", "--weights", "random", "--tv-weight", "2"]
    small = tmp_path / "candidate.png"
    Image.open(images["coffee"]).convert("RGB").resize((48, 32)).save(small)
    common[0] = str(small)
    assert main(["losses", *common, "--server", target]) == 0
    remote = capsys.readouterr().out
    assert main(["losses", *common, "--device", "cpu", "--gradient",
                 str(tmp_path / "g.npy")]) == 0
    local = capsys.readouterr().out
    table = [line for line in remote.splitlines() if not line.startswith("computed on")]
    assert table == local.splitlines()[:len(table)]
    assert table[0].split() == ["term", "loss", "weight", "weighted"]
    assert table[3].split()[:3] == ["tv", table[3].split()[1], "2"]
    assert "style layers:" in remote and "relu5_1" in remote
    assert remote.splitlines()[-1].endswith("for a 48x32 candidate")
    import numpy as np
    assert np.load(tmp_path / "g.npy").shape == (3, 32, 48)


def test_bf16_precision_through_the_cli(target, images, tmp_path, capsys):
    """--precision bf16 over --server gives the local bf16 losses, not the fp32 ones."""
    candidate = tmp_path / "candidate.png"
    Image.open(images["coffee"]).convert("RGB").resize((48, 32)).save(candidate)
    common = [str(candidate), "--content", str(images["cat"]), "--style", str(images["starry"]),
              "--arch", "vgg19", "--weights", "random"]
    tables = {}
    for where, precision in (("remote", "bf16"), ("local", "bf16"), ("remote", "fp32")):
        place = ["--server", target] if where == "remote" else ["--device", "cpu"]
        assert main(["losses", *common, "--precision", precision, *place]) == 0
        tables[where, precision] = [line for line in capsys.readouterr().out.splitlines()
                                    if not line.startswith("computed on")]
    assert tables["remote", "bf16"] == tables["local", "bf16"]
    assert tables["remote", "bf16"] != tables["remote", "fp32"]
    assert tables["remote", "bf16"][0].split() == ["term", "loss", "weight", "weighted"]


@pytest.mark.parametrize("flags,message", [
    (["--workers", "0"], "--workers: must be >= 1, got 0"),
    (["--queue-size", "-1"], "--queue-size: must be >= 0, got -1"),
    (["--port", "70000"], "--port: must be <= 65535, got 70000"),
])
def test_serve_flag_checks(flags, message, capsys):
    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err
