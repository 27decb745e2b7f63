"""The tqdm bar of ``gramstyle stylize`` ends where the run ended, and says "converged"."""

from __future__ import annotations

from gramstyle.cli import EXIT_OK, main

SHALLOW = ["--style-layers", "relu1_1,relu2_1", "--content-layers", "relu2_1",
           "--precision", "fp32", "--weights", "random", "--size", "32"]


def bar_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("stylize")]


def test_bar_of_a_converged_run_ends_at_its_last_iteration(images, tmp_path, capsys):
    # A tolerance of 50 % stops at the first test, after 25 of at most 60 iterations.
    assert main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 *SHALLOW, "--iterations", "60", "--tolerance", "0.5",
                 "-o", str(tmp_path / "out.png")]) == EXIT_OK
    captured = capsys.readouterr()
    assert "after 25 iterations (converged)" in captured.out
    last = bar_lines(captured.err)[-1]
    assert last.startswith("stylize (converged): 100%|")
    assert " 25/25 [" in last
    assert "/60" not in last


def test_bar_of_a_run_to_the_cap_is_unchanged(images, tmp_path, capsys):
    assert main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 *SHALLOW, "--iterations", "8", "--tolerance", "0",
                 "-o", str(tmp_path / "out.png")]) == EXIT_OK
    last = bar_lines(capsys.readouterr().err)[-1]
    assert last.startswith("stylize: 100%|") and " 8/8 [" in last
    assert "converged" not in last


def test_quiet_converged_run_has_no_bar_and_no_error(images, tmp_path, capsys):
    assert main(["stylize", "--content", str(images["cat"]), "--style", str(images["starry"]),
                 *SHALLOW, "--iterations", "60", "--tolerance", "0.5", "-q",
                 "-o", str(tmp_path / "out.png")]) == EXIT_OK
    captured = capsys.readouterr()
    assert "after 25 iterations (converged)" in captured.out
    assert captured.err == ""
