"""Shows that each fault in this folder fails a named test: apply the patch in a scratch copy of the repository,
run the test that guards it there, and report. A fault that no test catches exits non-zero.

    python tests/mutants/run.py            # every patch here
    python tests/mutants/run.py NAME ...   # some of them (file names without .patch)

Each entry of GUARDS names the test expected to fail; the unpatched copy must pass it, so a failure is the fault's.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUARDS = {
    "dynamickv_builds_snapkv": "tests/recipes/test_conformance.py::test_a_budget_recipe_evicts_with_its_own_policy[dynamickv]",
    "replay_ignores_seed": "tests/recipes/test_conformance.py::test_recipe_yaml_replays_byte_for_byte_with_its_seed[matryoshka]",
    "adamoe_drops_norm_topk": "tests/recipes/test_conformance.py::test_zero_strength_is_the_identity[adamoe]",
    "decode_kernel_ignores_valid": "tests/kernels/test_triton_kernels.py::test_model_decode_with_kernels_matches_pytorch[pyramid-padded]",
}


def run_test(folder: Path, test: str) -> int:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(folder)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test], cwd=folder,
                          env=env, capture_output=True, text=True).returncode


def main(names: list[str]) -> int:
    missed = []
    for name in names or sorted(GUARDS):
        test = GUARDS[name]
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "repo"
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv*", "*.egg-info"))
            clean = run_test(copy, test)
            subprocess.run(["git", "apply", str(ROOT / "tests" / "mutants" / f"{name}.patch")], cwd=copy, check=True)
            patched = run_test(copy, test)
        caught = clean == 0 and patched != 0
        print(f"{name}: {test} {'passes clean, fails patched' if caught else f'NOT CAUGHT (clean rc {clean}, patched rc {patched})'}",
              flush=True)
        if not caught:
            missed.append(name)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
