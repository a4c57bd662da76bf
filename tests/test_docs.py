"""Every ```python block of README.md and docs/**/*.md runs.

Each block is executed on its own, in a fresh namespace, with the working directory set to a
fresh temporary folder (so ``pk.save(model, "model.safetensors")`` works) and ``torch`` seeded
with 0. The namespace is pre-filled with small stand-ins, so snippets stay short and realistic:

===================  =============================================================================
name                 value
===================  =============================================================================
``torch``, ``nn``    ``import torch``, ``from torch import nn``
``pk``               ``import prunekit as pk``
``model``            a fresh MLP per snippet: ``nn.Sequential(Linear(32, 64), ReLU, Linear(64, 64),
                     ReLU, Linear(64, 10))``; its last Linear is the output head, which prunekit
                     leaves dense by default
``calibration``      a list of 4 input batches, each ``torch.randn(16, 32)``
``example_inputs``   one input batch, ``torch.randn(8, 32)``
``loader``           a list of ``n`` ``(x, y)`` batches: ``x`` of shape (8, 32), ``y`` class labels
                     in 0..9
``n``, ``total_steps``  ``len(loader)`` = 300: one pass over ``loader`` is the whole run
``optimizer``        ``torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)``
``loss_fn``          ``nn.CrossEntropyLoss()``
===================  =============================================================================

A block whose previous non-blank line is ``<!-- not tested: reason -->`` is skipped (for
snippets that need a downloaded model or a GPU). Test ids are ``file:line`` of the opening fence,
so a failure names the block.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SKIP = re.compile(r"^\s*<!--\s*not tested\s*:(.*?)-->\s*$", re.IGNORECASE)
FENCE_OPEN = re.compile(r"^\s*```\s*python\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")
STEPS = 300


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    return files + sorted((ROOT / "docs").rglob("*.md"))


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, skip reason or None) for every ```python block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if FENCE_OPEN.match(lines[i]):
            start = i
            j = i + 1
            while j < len(lines) and not FENCE_CLOSE.match(lines[j]):
                j += 1
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            skip = SKIP.match(prev)
            blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", skip.group(1).strip() if skip else None))
            i = j + 1
        else:
            i += 1
    return blocks


def collect():
    params = []
    for path in doc_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, code, skip in python_blocks(path):
            marks = [pytest.mark.skip(reason=f"not tested: {skip}")] if skip else []
            params.append(pytest.param(rel, line, code, id=f"{rel}:{line}", marks=marks))
    return params


def namespace() -> dict:
    import prunekit as pk

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loader = [(torch.randn(8, 32), torch.randint(0, 10, (8,))) for _ in range(STEPS)]
    return {
        "__name__": "__doc_snippet__",
        "torch": torch,
        "nn": nn,
        "pk": pk,
        "model": model,
        "calibration": [torch.randn(16, 32) for _ in range(4)],
        "example_inputs": torch.randn(8, 32),
        "loader": loader,
        "n": len(loader),
        "total_steps": len(loader),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        "loss_fn": nn.CrossEntropyLoss(),
    }


@pytest.mark.parametrize("path, line, code", collect())
def test_snippet_runs(path, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = namespace()
    try:
        exec(compile(code, f"{path}:{line}", "exec", dont_inherit=True), ns)  # no __future__ flags of this file
    except Exception as exc:
        numbered = "\n".join(f"{line + 1 + i:4d} | {s}" for i, s in enumerate(code.splitlines()))
        raise AssertionError(f"the python block at {path}:{line} failed: {type(exc).__name__}: {exc}\n{numbered}") from exc


def test_docs_found():
    """The docs exist and hold snippets (guards against a parser that silently finds nothing)."""
    pages = [p for p in doc_files() if p.parent != ROOT]
    assert pages, "no docs/**/*.md found"
    assert sum(len(python_blocks(p)) for p in pages) >= len(pages) // 2


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("path", [p.relative_to(ROOT).as_posix() for p in doc_files()])
def test_relative_links_resolve(path):
    """Every relative link of a page points at a file of the repository."""
    page = ROOT / path
    broken = [target for target, _ in LINK.findall(page.read_text(encoding="utf-8"))
              if "://" not in target and not target.startswith("mailto:")
              and not (page.parent / target).exists()]
    assert not broken, f"{path}: broken relative links {broken}"
