"""Runs the code examples of README.md and docs/*.md, so that the documentation stays true.

docs/getting-started-cpp.md is left out: its C++ is built by another test.

What runs
  ```python blocks: each is run as a script (example.py, written outside the working directory)
      by sys.executable in a fresh subprocess, with a timeout; blocks of one file share one
      temporary working directory (see "Working directories" below).
  ```console blocks: lines that start with "$ fastdcp " are run, with the virtual environment's
      bin directory first on PATH, in the file's working directory, after the file's python
      blocks. A command must exit with status 0, or with N when its line ends with the shell
      comment "# exit status N" (e.g. "$ fastdcp verify ckpt/damaged    # exit status 1").
      Other lines, including other "$ " commands, are output or context and are not run; output
      is not compared.
  Other blocks (bash, diff, cmake, cpp, json, untagged) are not run.

Markers: an HTML comment, invisible once rendered, on the line right before a block's opening
fence (several markers go on consecutive lines):
  <!-- doc-test: setup -->       the block is set-up code shown to the reader (e.g. a small
                                 model that later examples use): it runs on its own, and its
                                 code is put in front of every later python block of the file.
  <!-- doc-test: continues -->   the block continues the previous python block of the file: it
                                 runs appended to that block's code (and to whatever that block
                                 continued), as a reader running both in one session would.
  <!-- doc-test: torchrun N -->  the block runs under
                                 `python -m torch.distributed.run --standalone --nproc_per_node=N`;
                                 a block that continues it runs that way too.
Markers apply to python blocks only. A misplaced or unknown marker fails the collection of this
module.

Working directories: a python block that a later block continues, and a setup block, run in a
scratch directory of their own (their code runs again as part of the later program). Every other
python program runs in the file's shared working directory, in document order, so the examples
of one file must not write to the same paths, just as for a reader who runs them one after the
other; and setup blocks should not write files. Examples must run on a CPU-only host, quickly,
and write only under the current directory.

A failure names the file, the block's index (0-based, among all the file's fenced blocks) and its
first line; for a python block, the traceback's last line in example.py is mapped back to the
line of the document.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_FILES = {"docs/getting-started-cpp.md"}
PYTHON_TIMEOUT_S = 240
TORCHRUN_TIMEOUT_S = 420
CONSOLE_TIMEOUT_S = 120

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^`\s]*)[^`]*$")
_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")
_EXIT_STATUS = re.compile(r"#\s*exit status\s+(?P<status>\d+)\s*$")


@dataclass
class Block:
    file: str            # relative to the repository root
    index: int           # the block's index among the file's fenced blocks
    line: int            # 1-based line of the first line of code (after the opening fence)
    lang: str
    code: str
    setup: bool = False
    continues: bool = False
    torchrun: int | None = None
    # python blocks: the program this block runs as, and where each of its lines comes from
    program: list["Block"] = field(default_factory=list)
    final: bool = True   # False when a later block continues this one

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")

    @property
    def label(self) -> str:
        return f"{self.file} block {self.index} (line {self.line}: {self.first_line[:60]})"


def _parse_markers(body: str, where: str) -> dict:
    words = body.split()
    if words == ["setup"]:
        return {"setup": True}
    if words == ["continues"]:
        return {"continues": True}
    if len(words) == 2 and words[0] == "torchrun" and words[1].isdigit() and int(words[1]) >= 1:
        return {"torchrun": int(words[1])}
    raise ValueError(f"{where}: unknown doc-test marker {body!r} (setup, continues, torchrun N)")


def parse_blocks(rel: str) -> list[Block]:
    """The fenced blocks of a Markdown file, with their markers."""
    lines = (ROOT / rel).read_text().splitlines()
    blocks: list[Block] = []
    markers: dict = {}
    marker_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        if marker:
            parsed = _parse_markers(marker.group("body"), f"{rel}:{i + 1}")
            if set(parsed) & set(markers):
                raise ValueError(f"{rel}:{i + 1}: doc-test marker given twice for one block")
            markers.update(parsed)
            marker_line = i + 1
            i += 1
            continue
        fence = _FENCE.match(line)
        if not fence:
            if markers:
                raise ValueError(f"{rel}:{marker_line}: a doc-test marker must be right before a code block's fence")
            i += 1
            continue
        indent, opening, lang = fence.group("indent"), fence.group("fence"), fence.group("lang").lower()
        body, j = [], i + 1
        closing = re.compile(rf"^[ \t]*{re.escape(opening[0])}{{{len(opening)},}}[ \t]*$")
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if markers and lang != "python":
            raise ValueError(f"{rel}:{marker_line}: doc-test markers apply to python blocks only, not {lang or 'untagged'}")
        blocks.append(Block(rel, len(blocks), i + 2, lang, "\n".join(body) + "\n", **markers))
        markers = {}
        i = j + 1
    if markers:
        raise ValueError(f"{rel}:{marker_line}: a doc-test marker must be right before a code block's fence")
    _link_programs(blocks)
    return blocks


def _link_programs(blocks: list[Block]) -> None:
    """Sets each python block's program: the setup blocks before it, the blocks it continues, and itself."""
    python = [b for b in blocks if b.lang == "python"]
    setups: list[Block] = []
    for k, block in enumerate(python):
        if block.continues:
            if k == 0:
                raise ValueError(f"{block.file}:{block.line}: 'continues' on the file's first python block")
            previous = python[k - 1]
            if block.setup or previous.setup:
                raise ValueError(f"{block.file}:{block.line}: a setup block cannot continue or be continued")
            if block.torchrun is not None:
                raise ValueError(f"{block.file}:{block.line}: a continuing block runs as the block it continues; "
                                 f"put 'torchrun' on that one")
            previous.final = False
            block.program = previous.program + [block]
            block.torchrun = previous.torchrun
        else:
            block.program = setups + [block]
        if block.setup:
            block.final = False
            setups = setups + [block]


def _doc_files() -> list[str]:
    files = ["README.md"] + [f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f not in SKIPPED_FILES and (ROOT / f).exists()]


def _collect():
    python, console = [], []
    for rel in _doc_files():
        blocks = parse_blocks(rel)
        python += [b for b in blocks if b.lang == "python"]
        console += [b for b in blocks if b.lang == "console" and _commands(b)]
    return python, console


def _commands(block: Block) -> list[tuple[int, str, int]]:
    """(line, command, expected exit status) of each "$ fastdcp " line of a console block."""
    out = []
    for offset, line in enumerate(block.code.splitlines()):
        if line.startswith("$ fastdcp "):
            status = _EXIT_STATUS.search(line)
            out.append((block.line + offset, line[2:], int(status.group("status")) if status else 0))
    return out


PYTHON_BLOCKS, CONSOLE_BLOCKS = _collect()


# --- running ----------------------------------------------------------------------------------------
def _env() -> dict:
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


class _FileWorkspace:
    """The shared working directory of one Markdown file, and what has run in it."""

    def __init__(self, path: Path):
        self.path = path
        self.results: dict[int, str | None] = {}  # block index -> None (passed) or the failure


_workspaces: dict[str, _FileWorkspace] = {}


def _workspace(rel: str, tmp_path_factory) -> _FileWorkspace:
    if rel not in _workspaces:
        name = re.sub(r"[^A-Za-z0-9]+", "_", rel)
        _workspaces[rel] = _FileWorkspace(tmp_path_factory.mktemp(f"doc_{name}"))
    return _workspaces[rel]


def _run(command: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr); the status is None when the command timed out, in which case
    its whole process group (torchrun's workers, the writer processes) is killed."""
    process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr


def _doc_line(block: Block, stderr: str, script: Path) -> str:
    """Where in the document the last traceback line of the script points."""
    found = re.findall(rf'File "{re.escape(str(script))}", line (\d+)', stderr)
    if not found:
        return ""
    number = int(found[-1])
    for part in block.program:
        count = len(part.code.splitlines())
        if number <= count:
            return f"; the error is at {part.file}:{part.line + number - 1}"
        number -= count
    return ""


def _run_program(block: Block, cwd: Path, script_dir: Path) -> str | None:
    """Runs a python block's program in cwd; None when it passed, else why it failed."""
    script_dir.mkdir(parents=True, exist_ok=True)
    script = script_dir / "example.py"
    script.write_text("".join(part.code for part in block.program))
    if block.torchrun is None:
        command = [sys.executable, str(script)]
        timeout = PYTHON_TIMEOUT_S
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={block.torchrun}", str(script)]
        timeout = TORCHRUN_TIMEOUT_S
    returncode, stdout, stderr = _run(command, cwd, timeout)
    if returncode is None:
        return f"{block.label} timed out after {timeout}s\n--- stderr ---\n{stderr[-6000:]}"
    if returncode == 0:
        return None
    return (f"{block.label} exited with status {returncode}{_doc_line(block, stderr, script)}\n"
            f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-6000:]}")


def _run_python_block(block: Block, tmp_path_factory, scratch: Path) -> str | None:
    workspace = _workspace(block.file, tmp_path_factory)
    if block.index not in workspace.results:
        if block.final:
            workspace.results[block.index] = _run_program(block, workspace.path, scratch / "script")
        else:
            (scratch / "work").mkdir(parents=True, exist_ok=True)
            workspace.results[block.index] = _run_program(block, scratch / "work", scratch / "script")
    return workspace.results[block.index]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"{b.file}[{b.index}] {b.first_line[:40]}")
def test_python_example(block: Block, tmp_path_factory, tmp_path):
    failure = _run_python_block(block, tmp_path_factory, tmp_path)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("block", CONSOLE_BLOCKS, ids=lambda b: f"{b.file}[{b.index}] {b.first_line[:40]}")
def test_console_example(block: Block, tmp_path_factory, tmp_path):
    # The file's python programs run first (once), in its working directory: the commands look at
    # what they wrote.
    for earlier in PYTHON_BLOCKS:
        if earlier.file == block.file and earlier.final:
            failure = _run_python_block(earlier, tmp_path_factory, tmp_path / f"block{earlier.index}")
            if failure is not None:
                pytest.fail(f"{block.label} needs the file's python examples, and one failed:\n{failure}", pytrace=False)
    fastdcp = shutil.which("fastdcp", path=_env()["PATH"])
    assert fastdcp is not None, f"no fastdcp command beside {sys.executable}"
    cwd = _workspace(block.file, tmp_path_factory).path
    for line, command, expected in _commands(block):
        argv = shlex.split(command, comments=True)
        returncode, stdout, stderr = _run([fastdcp] + argv[1:], cwd, CONSOLE_TIMEOUT_S)
        if returncode != expected:
            outcome = "timed out" if returncode is None else f"exited with status {returncode}"
            pytest.fail(f"{block.file}:{line}: `{command}` {outcome}, the document implies status {expected}\n"
                        f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-3000:]}", pytrace=False)
