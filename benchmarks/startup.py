"""Start-up of every Snakemake job: the seconds a rule spends importing before its first useful line.

    .venv/bin/python benchmarks/startup.py                      # this tree, best of 3
    .venv/bin/python benchmarks/startup.py --base HEAD~3        # this tree beside git revision HEAD~3
    .venv/bin/python benchmarks/startup.py --repeats 5 --rules generate score

What is timed, per rule (one rule = one script in workflow/scripts):
  - the script's own top-level import statements (read with `ast`, run as they are written), then
  - the imports its stage makes on its first call, where the heavy libraries come in: for the rules that
    load a model, `pipeline.models`, `import transformers`, the tokenizer classes, the causal-LM class of
    `--model-type` resolved through transformers' auto mapping (that imports its modeling file, and with it
    transformers.modeling_utils) and `from nnsight import TransformersModel`, as `models.LoadedModel` does
    (export and prepare_model build the bare transformers model: no nnsight); optuna for optimize; the
    tokenizer classes for length. Rules whose model is optional (score's judges,
    stability's reselection) are timed without it, as the default experiment runs them.
Each is one fresh `python -c` process (the interpreter's own start included), run from the tree's root with
PYTHONPATH at the tree; wall seconds are perf_counter around the process, CPU seconds its user + system time
(less sensitive to a busy machine). Best of --repeats for each. With --base, the revision is checked out into a
temporary git worktree, measured the same way (runs alternate between the two trees) and removed afterwards.
The `(python)` row is an empty interpreter: the floor no import can go under.
"""

from __future__ import annotations

import argparse
import ast
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# what a stage imports on its first call, before its first useful line (see the docstring)
TOKENIZER = ["from transformers import AutoTokenizer, PreTrainedTokenizerFast"]
CAUSAL_LM = ["import pipeline.models", "import transformers", *TOKENIZER,
             "from transformers import AutoConfig",
             "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING",
             "MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model({model_type!r}))]"]
MODEL = [*CAUSAL_LM, "from nnsight import TransformersModel"]
FIRST_CALL = {
    "activations": MODEL, "select": MODEL, "sweep": MODEL, "generate": MODEL,
    "export": CAUSAL_LM,  # models.load: the bare transformers model, no nnsight wrapper
    "optimize": [*MODEL, "import optuna"],
    "prepare_model": CAUSAL_LM,  # a GGUF or random model is built with transformers; no nnsight
    "length": ["import pipeline.models", *TOKENIZER],  # the models' tokenizers only
}


def script_imports(script: Path) -> list[str]:
    """The script's top-level import statements, as written."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def rule_code(script: Path, model_type: str) -> str:
    lines = script_imports(script) + [s.format(model_type=model_type) for s in FIRST_CALL.get(script.stem, [])]
    return "\n".join(lines)


def time_once(code: str, tree: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of one fresh interpreter running `code` in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # the package must come from `tree`, not from wherever it is installed
    check = f"import pipeline; assert pipeline.__file__.startswith({str(tree) + os.sep!r}), pipeline.__file__\n"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code + "\n" + check], cwd=tree, env=env, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def rules_of(tree: Path, only: list[str] | None) -> dict[str, Path]:
    scripts = {p.stem: p for p in sorted((tree / "workflow" / "scripts").glob("*.py"))}
    return {name: p for name, p in scripts.items() if not only or name in only}


def measure(trees: dict[str, Path], rules: list[str], repeats: int, model_type: str) -> dict:
    """best[(tree label, rule)] = (wall, cpu), each the minimum over `repeats`; the trees alternate."""
    codes = {}
    for label, tree in trees.items():
        scripts = rules_of(tree, rules)
        codes[label] = {"(python)": "pass", **{r: rule_code(scripts[r], model_type) for r in rules if r in scripts}}
    best: dict = {}
    for rep in range(repeats):
        for rule in ["(python)", *rules]:
            for label, tree in trees.items():
                if rule not in codes[label]:
                    continue
                wall, cpu = time_once(codes[label][rule], tree)
                old = best.get((label, rule), (float("inf"), float("inf")))
                best[(label, rule)] = (min(old[0], wall), min(old[1], cpu))
        print(f"  round {rep + 1}/{repeats} done", file=sys.stderr)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="a git revision to compare with (checked out into a temp worktree)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many fresh processes")
    ap.add_argument("--rules", nargs="+", default=None, help="only these rules (script names)")
    ap.add_argument("--model-type", default="qwen2", help="the causal-LM class resolved for the model rules")
    ap.add_argument("--show", action="store_true", help="print each rule's timed code first")
    args = ap.parse_args()

    rules = list(rules_of(ROOT, args.rules))
    if args.show:
        for rule in rules:
            print(f"# {rule}\n{rule_code(ROOT / 'workflow' / 'scripts' / f'{rule}.py', args.model_type)}\n")
    trees = {"now": ROOT}
    base_dir = None
    if args.base:
        base_dir = Path(tempfile.mkdtemp(prefix="startup-base-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base_dir), args.base],
                       check=True)
        trees = {"base": base_dir, "now": ROOT}
    try:
        best = measure(trees, rules, args.repeats, args.model_type)
    finally:
        if base_dir is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)], check=True)
            base_dir.parent.rmdir()

    print(f"start-up seconds per rule, best of {args.repeats} (wall; CPU = user + system)"
          + (f"; base = {args.base}" if args.base else ""))
    if args.base:
        print(f"{'rule':16s} {'base wall':>9s} {'now wall':>9s} {'ratio':>6s}   {'base CPU':>9s} {'now CPU':>9s} "
              f"{'ratio':>6s}")
    else:
        print(f"{'rule':16s} {'wall':>9s} {'CPU':>9s}")
    for rule in ["(python)", *rules]:
        now = best.get(("now", rule))
        if not args.base:
            print(f"{rule:16s} {now[0]:9.2f} {now[1]:9.2f}")
            continue
        base = best.get(("base", rule))
        if base is None or now is None:
            print(f"{rule:16s} {'(only in one tree)':>30s}")
            continue
        print(f"{rule:16s} {base[0]:9.2f} {now[0]:9.2f} {now[0] / base[0]:6.2f}   {base[1]:9.2f} {now[1]:9.2f} "
              f"{now[1] / base[1]:6.2f}")


if __name__ == "__main__":
    main()
