"""`fleet bench draft`: how fast and how big the board's draft model is, per quantisation.

Each measurement runs in a fresh Python process so that its peak resident
memory is its own: an ONNX Runtime process imports only what a board imports (onnxruntime,
numpy, tokenizers), the torch process is the eager baseline on the same checkpoint. Speed is
greedy decoding, one token per step, after a prefill of a fixed code prompt; the logit
difference is the one the export recorded when it checked itself against torch.
"""

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import psutil
import typer
from pydantic import BaseModel, ConfigDict

from device.manifest import (
    MANIFEST_FILE,
    QUANTS,
    TOKENIZER_FILE,
    Quant,
    draft_store_dir,
    read_manifest,
)
from fleet.logging import get_logger

BENCH_PROMPT = (
    "import json\n\n\ndef load_readings(path: str) -> list[dict]:\n"
    '    """Read sensor readings from a JSON file and drop the invalid ones."""\n'
)


class DraftBenchRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    runtime: Literal["onnxruntime", "torch"]
    quant: Quant
    tokens_per_s: float
    prefill_ms: float
    size_mb: float
    peak_rss_mb: float
    rss_delta_mb: float  # peak minus the process's size after imports: what the model adds
    max_abs_logit_diff: float | None  # vs torch, from the export's self-check
    greedy_prefix: int  # leading generated tokens equal to torch's greedy tokens


def run_draft_bench(
    model: str = "tiny",
    quants: Sequence[Quant] = QUANTS,
    tokens: int = 64,
    threads: int | None = None,
) -> dict:
    """Export what is missing, measure torch and each quantisation; a JSON-ready dict."""
    if tokens < 1:
        raise ValueError("tokens must be at least 1")
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        raise ValueError(f"unknown quantisation {unknown[0]!r}; use {', '.join(QUANTS)}")
    with tempfile.TemporaryDirectory(prefix="fleet-bench-draft-") as scratch:
        home = None  # real models: exports live in the draft store and are reused next time
        if model == "tiny":
            from fleet.models.tiny import write_tiny_models

            name, (_, checkpoint), home = "tiny", write_tiny_models(Path(scratch)), Path(scratch)
        else:
            from fleet.models.export import resolve_source

            name, checkpoint = resolve_source(model)
        float_dir = draft_store_dir(name, "none", home)
        ordered = sorted(quants, key=QUANTS.index)  # the float export first: the others reuse it
        exports = {
            q: _exported(checkpoint, draft_store_dir(name, q, home), q, float_dir) for q in ordered
        }
        prompt = _prompt_ids(checkpoint)
        log = get_logger(component="bench-draft", model=name)
        log.info("measuring torch eager", tokens=tokens)
        reference = _in_fresh_process(
            "torch", checkpoint=str(checkpoint), prompt=prompt, tokens=tokens, threads=threads
        )
        rows = [
            DraftBenchRow(
                runtime="torch",
                quant="none",
                tokens_per_s=reference["tokens_per_s"],
                prefill_ms=reference["prefill_ms"],
                size_mb=_size_mb(sorted(checkpoint.glob("*.safetensors"))),
                peak_rss_mb=reference["peak_rss_mb"],
                rss_delta_mb=reference["rss_delta_mb"],
                max_abs_logit_diff=None,
                greedy_prefix=tokens,
            )
        ]
        for quant, model_dir in exports.items():
            log.info("measuring onnxruntime", quant=quant, tokens=tokens)
            manifest = read_manifest(model_dir)
            run = _in_fresh_process(
                "onnx", model_dir=str(model_dir), prompt=prompt, tokens=tokens, threads=threads
            )
            rows.append(
                DraftBenchRow(
                    runtime="onnxruntime",
                    quant=quant,
                    tokens_per_s=run["tokens_per_s"],
                    prefill_ms=run["prefill_ms"],
                    size_mb=_size_mb(
                        [model_dir / f for f in manifest.files if f.startswith("model")]
                    ),
                    peak_rss_mb=run["peak_rss_mb"],
                    rss_delta_mb=run["rss_delta_mb"],
                    max_abs_logit_diff=manifest.validation.max_abs_diff
                    if manifest.validation
                    else None,
                    greedy_prefix=_common_prefix(run["tokens"], reference["tokens"]),
                )
            )
    return {
        "model": name,
        "checkpoint": str(checkpoint),
        "prompt_tokens": len(prompt),
        "tokens": tokens,
        "threads": threads,
        "cpu_count": psutil.cpu_count(logical=True),
        "rows": [row.model_dump() for row in rows],
    }


def bench_draft(
    model: Annotated[
        str, typer.Option("--model", help="tiny, a catalog name or a checkpoint directory")
    ] = "tiny",
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    quant: Annotated[
        list[str] | None,
        typer.Option("--quant", help="none, int8, int4 (repeatable; default: all three)"),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="greedy tokens per run")] = 64,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="intra-op threads (default: all cores)")
    ] = None,
) -> None:
    """Draft model speed through ONNX Runtime (per quantisation) and torch, size and memory."""
    result = run_draft_bench(model, quants=tuple(quant or QUANTS), tokens=tokens, threads=threads)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        from rich.console import Console

        Console().print(draft_table(result))


def draft_table(result: dict):  # -> rich.table.Table
    """The bench result as a table, one row per runtime and quantisation."""
    from rich.table import Table

    table = Table(
        title=f"draft {result['model']}: {result['tokens']} greedy tokens after a "
        f"{result['prompt_tokens']}-token prompt, {result['cpu_count']} CPUs"
    )
    for column in (
        "runtime",
        "quant",
        "tok/s",
        "prefill ms",
        "disk MB",
        "peak RSS MB",
        "+RSS MB",
        "max Δlogit",
        "greedy=torch",
    ):
        table.add_column(column, justify="left" if column in ("runtime", "quant") else "right")
    for row in result["rows"]:
        diff = row["max_abs_logit_diff"]
        table.add_row(
            "ort" if row["runtime"] == "onnxruntime" else row["runtime"],
            row["quant"],
            f"{row['tokens_per_s']:.1f}",
            f"{row['prefill_ms']:.0f}",
            f"{row['size_mb']:.1f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['rss_delta_mb']:.0f}",
            "-" if diff is None else f"{diff:.2g}",
            f"{row['greedy_prefix']}/{result['tokens']}",
        )
    return table


def _exported(checkpoint: Path, model_dir: Path, quant: Quant, float_dir: Path) -> Path:
    """The export in `model_dir`, made now if it is not there (from the float export in
    `float_dir` when that exists: exports of a real model take minutes)."""
    if not (model_dir / MANIFEST_FILE).is_file():
        from fleet.models.export import export_draft

        reuse = quant != "none" and (float_dir / MANIFEST_FILE).is_file()
        get_logger(component="bench-draft").info("exporting", quant=quant, out=str(model_dir))
        export_draft(checkpoint, model_dir, quant, float_export=float_dir if reuse else None)
    return model_dir


def _prompt_ids(checkpoint: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(checkpoint / TOKENIZER_FILE)).encode(BENCH_PROMPT).ids


def _size_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _in_fresh_process(worker: str, **arguments: object) -> dict:
    """Run a worker of this module as `python -m fleet.bench.draft WORKER JSON` (a subprocess,
    not multiprocessing: that would re-import the caller's main module in the child)."""
    done = subprocess.run(
        [sys.executable, "-m", "fleet.bench.draft", worker, json.dumps(arguments)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {worker} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory(baseline_bytes: int) -> dict:
    """Peak resident memory of this process (Linux VmHWM: per address space, so a spawned
    worker does not inherit its parent's peak as ru_maxrss would across fork and exec)."""
    status = Path("/proc/self/status").read_text()
    peak = (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        * 1024
    )
    return {"peak_rss_mb": peak / 1e6, "rss_delta_mb": (peak - baseline_bytes) / 1e6}


def _onnx_worker(model_dir: str, prompt: list[int], tokens: int, threads: int | None) -> dict:
    """Greedy decoding through the board's runner (runs in its own process)."""
    from device.runner import DraftRunner

    baseline = psutil.Process().memory_info().rss
    runner = DraftRunner(Path(model_dir), intra_op_threads=threads)
    return {**_time_greedy(runner.prefill, runner.step, prompt, tokens), **_memory(baseline)}


def _torch_worker(checkpoint: str, prompt: list[int], tokens: int, threads: int | None) -> dict:
    """The same greedy decoding with transformers eager and its DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    if threads is not None:
        torch.set_num_threads(threads)
    baseline = psutil.Process().memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    cache = DynamicCache()

    def feed(ids: list[int]):
        return model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]

    with torch.inference_mode():
        timing = _time_greedy(feed, lambda token: feed([token]), prompt, tokens)
    return {**timing, **_memory(baseline)}


def _time_greedy(prefill, step, prompt: list[int], tokens: int) -> dict:
    """prefill(ids) and step(token) return next-token logits (numpy or torch: both argmax)."""
    started = time.perf_counter()
    logits = prefill(prompt)
    prefill_s = time.perf_counter() - started
    generated: list[int] = []
    started = time.perf_counter()
    for _ in range(tokens):
        generated.append(int(logits.argmax()))
        logits = step(generated[-1])
    decode_s = time.perf_counter() - started
    return {"tokens": generated, "tokens_per_s": tokens / decode_s, "prefill_ms": prefill_s * 1e3}


_WORKERS = {"onnx": _onnx_worker, "torch": _torch_worker}

if __name__ == "__main__":
    name, arguments = sys.argv[1], json.loads(sys.argv[2])
    sys.stdout.write(json.dumps(_WORKERS[name](**arguments)) + "\n")
