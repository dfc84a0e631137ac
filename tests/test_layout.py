"""The layout of docs/ARCHITECTURE.md, checked on the source: import direction, no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("carclf", "serve", "jobs", "bench")
ENTRY = {"carclf.cli", "carclf.__main__"}  # the entry layer may import serve
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250
MAX_MODULE_LINES = 600  # in the library and the serving side
MAX_INGRESS_LINES = 400  # the routes only: every HTTP concern beside them has its own module


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), str(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _imports(tree: ast.Module) -> set[str]:
    """Every module an ``import`` or ``from … import`` names, at any depth (lazy ones too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(tree) & set(sources) - {name} for name, tree in sources.items()}


def test_the_library_imports_neither_serve_nor_jobs() -> None:
    for name, imported in _graph().items():
        if name.startswith("carclf") and name not in ENTRY:
            above = sorted(m for m in imported if m.split(".")[0] in ("serve", "jobs"))
            assert not above, f"{name} imports {above}"


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " → ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for child in sorted(graph.get(name, ())):
            if not (child.startswith(name + ".") or name.startswith(child + ".")):
                visit(child, [*path, name])  # a package and its own modules are not a cycle
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_no_function_is_longer_than_the_style_allows() -> None:
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_no_class_is_longer_than_the_style_allows() -> None:
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert not long, long


def test_no_module_of_the_library_or_the_server_is_a_warehouse() -> None:
    lines = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for package in ("carclf", "serve")
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    long = {path: n for path, n in lines.items() if n > MAX_MODULE_LINES}
    assert not long, long
    assert lines["serve/ingress.py"] <= MAX_INGRESS_LINES


def test_the_library_sets_up_no_http_front() -> None:
    """Joining or starting Ray is the library's; Serve's HTTP front is the server's
    (``serve/front.py``), so training never sets up an HTTP proxy."""
    assert "haproxy" not in (ROOT / "carclf" / "runtime.py").read_text().lower()
    scripts = [p for p in (ROOT / "carclf").rglob("*") if p.suffix in (".sh", ".bash")]
    assert not scripts, scripts


def _loaded_after(code: str, modules: list[str]) -> tuple[str, str]:
    """Which of ``modules`` a fresh Python has loaded after running ``code``, as a sorted list
    printed; and its whole output, for the failure message."""
    check = f"\nimport sys\nprint(sorted(m for m in {modules!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", code + check], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip(), out.stdout + out.stderr


def test_the_classifier_replica_starts_without_torch_or_timm() -> None:
    """A classifier replica (onnxruntime only) must not pay torch's and timm's imports: they
    are most of the time before a replica that autoscaling or a restart adds can serve."""
    code = "import serve.deployments, carclf.inference, carclf.bundle"
    loaded, out = _loaded_after(code, ["torch", "timm", "torchvision"])
    assert loaded == "[]", out


def test_the_ingress_replica_loads_no_model_libraries() -> None:
    """An ingress replica decodes, crops and routes. Cropping an image as its replicas do
    (``eval_resize_crop``: Pillow's, held to timm's by ``test_data_loading``), it has loaded
    neither torch, torchvision nor timm, nor the explanation stack it only checks requests for
    (``carclf.explain_request``): pytorch-grad-cam, OpenCV, scikit-learn, matplotlib."""
    code = """
from PIL import Image
import serve.ingress
from carclf.data.transforms import Preprocess, eval_resize_crop
pre = Preprocess(input_size=(3, 224, 224), mean=(.5,) * 3, std=(.5,) * 3, crop_pct=.875)
assert eval_resize_crop(pre)(Image.new("RGB", (640, 480))).size == (224, 224)
"""
    libraries = ["torch", "torchvision", "timm", "pytorch_grad_cam", "cv2", "sklearn", "matplotlib"]
    loaded, out = _loaded_after(code, libraries)
    assert loaded == "[]", out
