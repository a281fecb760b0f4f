"""A board has no torch: everything in device/ imports and drafts with torch made unimportable."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

pytest_plugins = ["tests.draft_fixtures"]

BOARD_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys
    from pathlib import Path

    BLOCKED = {"torch", "transformers"}

    class NoTorchOnBoards(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed on a board")
            return None

    sys.meta_path.insert(0, NoTorchOnBoards())
    try:
        import torch  # noqa: F401
        sys.exit("the import blocker does not work")
    except ImportError:
        pass

    import device
    modules = [m.name for m in pkgutil.walk_packages(device.__path__, "device.")]
    for name in modules:
        importlib.import_module(name)

    import numpy as np
    from device.drafter import Drafter
    from device.runner import DraftRunner
    from fleet.sampling import SamplingParams

    runner = DraftRunner(Path(sys.argv[1]))
    drafter = Drafter(runner, k_max=4, threshold=0.0, top_k=8)
    drafter.start(runner.tokenizer.encode("def add(a, b):").ids)
    rng = np.random.default_rng(0)
    greedy = drafter.draft(None, SamplingParams(), rng)
    drafter.commit(2, greedy.tokens[2])
    sampled = drafter.draft(None, SamplingParams(temperature=0.8), rng)
    print(json.dumps({
        "modules": modules,
        "greedy": list(greedy.tokens),
        "sampled": list(sampled.tokens),
        "q_sizes": [len(q.ids) for q in sampled.q],
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    }))
    """
)


def test_device_package_runs_without_torch(tiny_draft_onnx: Path):
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", BOARD_SCRIPT, str(tiny_draft_onnx)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"device.runner", "device.drafter", "device.sampling", "device.manifest"} <= set(
        report["modules"]
    )
    assert len(report["greedy"]) == 4 and len(report["sampled"]) == 4
    assert all(1 <= size <= 8 for size in report["q_sizes"])
    assert report["loaded"] == []
