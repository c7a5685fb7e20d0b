"""The README runs as written: its marked blocks are executed (with tiny step counts), and every `didicm` line
in any block parses with today's command line, so the docs cannot rot; the study section quotes only numbers
that the generated report holds.

A block runs when the line before it is ``<!-- readme-test: run -->``. Bash lines run one by one in a fresh
folder that sees the repository's scripts/ and configs/, with these speed-ups appended: ``didicm train`` gets
``--steps 4 --no-progress`` and a 40-image validation split, ``didicm eval`` gets ``--limit 24``, and
``png_folder.py`` writes 12 images per class.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from didicm.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MARK = "<!-- readme-test: run -->"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _blocks() -> list[tuple[str, str, bool]]:
    """(language, body, marked to run) of every fenced block."""
    out = []
    for match in re.finditer(r"```(\w*)\n(.*?)```", README, flags=re.S):
        before = README[:match.start()].rstrip().splitlines()
        out.append((match.group(1), match.group(2), bool(before) and before[-1].strip() == MARK))
    return out


def _commands(body: str) -> list[str]:
    lines = []
    for line in body.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()  # trailing comments
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _fast(line: str) -> str:
    if line.startswith("didicm train"):
        return line + " --steps 4 --no-progress --set data.val_size=40"
    if line.startswith("didicm eval"):
        return line + " --limit 24 --batch-size 24 --no-progress"
    return line.replace("--per-class 600", "--per-class 12")


RUN_BLOCKS = [(lang, body) for lang, body, run in _blocks() if run]


def test_the_readme_marks_blocks_to_run():
    assert {lang for lang, _ in RUN_BLOCKS} == {"bash", "python"} and len(RUN_BLOCKS) >= 3


@pytest.mark.parametrize("line", sorted({line for lang, body, _ in _blocks() if lang == "bash"
                                         for line in _commands(body) if line.startswith("didicm ")}))
def test_every_didicm_line_parses(line):
    line = re.sub(r"\$\([^)]*\)", "image.png", re.sub(r"\[[^\]]*\]", "", line))  # [optional] parts, $(...)
    argv = shlex.split(line)[1:]
    build_parser().parse_args(argv)


def test_every_repository_path_in_the_readme_exists():
    for path in set(re.findall(r"\b((?:configs|scripts|benchmarks|tests|didicm)/[\w./-]+\.(?:py|yaml|sh))", README)):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(RUN_BLOCKS)))
def test_marked_block_runs(index, tmp_path):
    lang, body = RUN_BLOCKS[index]
    if "fashion" in body and not FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    if lang == "python":
        exec(compile(body, "README.md", "exec"), {})
        return
    for name in ("scripts", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for line in _commands(body):
        done = subprocess.run(["bash", "-c", _fast(line)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"README line failed: {line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def test_every_study_number_in_the_readme_is_copied_from_the_generated_report():
    """The study section's prose is written by hand; each number in it, sign included, and each "mean ± std" pair
    must appear in results/fashion-mnist/report.md (generated from study.json), so a retyped number fails."""
    section = README.split("## The uncertainty study", 1)[1].split("\n## ", 1)[0]
    report = (REPO / "results" / "fashion-mnist" / "report.md").read_text()
    numbers = re.findall(r"(?<![\w.])[+-]?\d+\.\d+", section)
    assert len(numbers) >= 10, "the study section quotes its results"
    # whole numbers only: "1.2" must not pass by sitting inside "11.28"
    assert [n for n in numbers if not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", report)] == []
    pairs = re.findall(r"([+-]?\d+\.\d+) ± (\d+\.\d+)", section)
    assert pairs and [p for p in pairs if f"{p[0]} ± {p[1]}" not in report] == []


def test_every_verdict_quoted_in_the_readme_study_section_follows_the_two_sd_rule():
    """A gap the README calls a tie must lie within two seed standard deviations, and a win or loss beyond them
    (rounded numbers get half a unit of their last digit of slack), so a hand-written verdict cannot drift."""
    section = README.split("## The uncertainty study", 1)[1].split("\n## ", 1)[0]
    quoted = re.findall(r"([+-]?\d+\.(\d+)) ± (\d+\.\d+)[ ,;(]*(?:a |an )?(win|loss|tie)\b", section)
    assert len(quoted) >= 10, "the study section quotes verdicts"
    wrong = []
    for mean, decimals, std, verdict in quoted:
        slack = 0.5 * 10 ** -len(decimals)
        low, high = abs(float(mean)) - slack, abs(float(mean)) + slack
        inside_for_sure, outside_for_sure = high <= 2 * (float(std) - slack), low > 2 * (float(std) + slack)
        if (verdict == "tie" and outside_for_sure) or (verdict != "tie" and inside_for_sure):
            wrong.append(f"{mean} ± {std} ({verdict})")
    assert wrong == []
