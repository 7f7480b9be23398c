"""Dependencies run one way: model <- parallel <- train <- commands, infer uses the model and
the checkpoint format only, and no module imports itself back through others (every import in
a module counts, also those inside functions)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hpcllm"

#: package -> hpcllm packages it may import (besides itself and the leaf modules below)
ALLOWED = {
    "model": set(),
    "parallel": {"model"},
    "train": {"model", "parallel", "data", "interop.hf", "interop.safetensors_io"},
    "infer": {"model", "data", "train.checkpoint"},
    # reading HF directories needs the model and tokenizers; writing them reads any checkpoint
    "interop": {"model", "data", "train.checkpoint", "infer"},
}
#: leaf modules anything may import
LEAVES = {"errors", "fileio", "exitcodes", "config", "schema", "options", "locking"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for f in PKG.rglob("*.py")}
    graph = {}
    for mod, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("hpcllm")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpcllm"):
                # `from pkg import submodule` depends on the submodule, not on the package
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(files)
                deps |= subs
                if len(subs) < len(node.names):
                    deps.add(node.module)
        graph[mod] = deps
    # keep only names that are modules; the top package (its version) is a leaf
    return {m: {d for d in deps if d in files and d not in (m, "hpcllm")} for m, deps in graph.items()}


def _sub(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # packages' __init__ modules import their own children: collapse each package's cycle
    # through its __init__ by ignoring edges into a module's own ancestors
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if m.startswith(d + "."):
                continue
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_dependencies_run_one_way():
    bad = []
    for mod, deps in import_graph().items():
        pkg = _sub(mod)
        if pkg not in ALLOWED:
            continue
        for d in deps:
            dp = _sub(d)
            target = d.removeprefix("hpcllm.")
            if dp == pkg or target in LEAVES or dp in LEAVES:
                continue
            if dp in ALLOWED[pkg] or target in ALLOWED[pkg] or any(target.startswith(a + ".") for a in ALLOWED[pkg]):
                continue
            bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_the_pipeline_trainer_is_gone():
    # one loop serves every layout: the pipeline contributes its step runner only
    assert not (PKG / "parallel" / "pipeline" / "trainer.py").exists()
    graph = import_graph()
    loops = [m for m in graph if m.endswith("trainer")]
    assert loops == ["hpcllm.train.trainer"], loops
