"""`fleet demo`: the product's main job on one machine, end to end.

Starts a broker, a verification server and N boards, sends the shipped prompts (code and prose)
as an IoT app would, shows the text as it streams in, and checks every output against what the
target alone produces for the same prompt (greedy): the lossless claim, checked on each run.
"""

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleet.app import new_request_id
from fleet.config import (
    DEFAULT_LINEAR_KERNEL,
    DeviceSettings,
    LinearKernel,
    ServerSettings,
    Settings,
)
from fleet.local import FleetModels, LocalFleet
from fleet.protocol import GenerationRequest, GenerationResponse

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
DEFAULT_DRAFT_QUANT = "int4"


class Prompt(BaseModel):
    kind: str
    prompt: str


class DemoResult(BaseModel):
    device: str
    request_id: str
    prompt: str
    text: str
    tokens: list[int]
    reference: list[int]
    response: GenerationResponse

    @property
    def lossless(self) -> bool:
        return self.tokens == self.reference


def shipped_prompts() -> list[Prompt]:
    raw = resources.files("fleet").joinpath("data/prompts.json").read_text()
    return [Prompt.model_validate(p) for p in json.loads(raw)]


def tiny_models(workdir: Path) -> FleetModels:
    """The seeded tiny pair with its draft exported to ONNX (float32)."""
    from fleet.models.export import export_draft
    from fleet.models.tiny import write_tiny_models

    target, draft = write_tiny_models(workdir / "tiny")
    report = export_draft(draft, workdir / "tiny" / "draft-onnx", "none")
    return FleetModels(target_name="tiny", target_dir=target, draft_dir=report.out)


def store_models(home: Path, console: Console) -> FleetModels:
    """The Qwen pair from the model store, pulled and exported on first use."""
    from fleet.models.cli import pull_with_progress
    from fleet.models.export import draft_store_dir, export_draft
    from fleet.models.store import ModelStore

    store = ModelStore(home)
    for name in (DEFAULT_TARGET, DEFAULT_DRAFT):
        if not store.status(name).verified:
            console.print(f"pulling {name} into {home} (first use only)")
            pull_with_progress(store, name)
    draft_dir = draft_store_dir(DEFAULT_DRAFT, DEFAULT_DRAFT_QUANT)
    if not (draft_dir / "manifest.json").is_file():
        console.print(f"exporting {DEFAULT_DRAFT} to ONNX ({DEFAULT_DRAFT_QUANT}; first use only)")
        with console.status("exporting") as status:
            export_draft(
                store.path(DEFAULT_DRAFT),
                draft_dir,
                DEFAULT_DRAFT_QUANT,
                progress=lambda stage, done, total: status.update(f"export: {stage} ({done}/{total})"),
            )
    return FleetModels(target_name=DEFAULT_TARGET, target_dir=store.path(DEFAULT_TARGET), draft_dir=draft_dir)


def reference_tokens(
    target_dir: Path, prompt_ids: list[list[int]], max_new_tokens: int, linear_kernel: LinearKernel = DEFAULT_LINEAR_KERNEL
) -> list[list[int]]:
    """What the target alone emits for each prompt, greedy, one prompt at a time, with the
    linear kernels the server uses (server/kernels.py): the claim is about this server's target."""
    import torch

    from server.runner import load_reference

    model = load_reference(target_dir, "float32", linear_kernel)
    outputs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, attention_mask=torch.ones(1, len(ids), dtype=torch.long)
            )
            outputs.append(out[0, len(ids):].tolist())
    return outputs


def run_demo(
    *, tiny: bool, devices: int, as_json: bool, max_new_tokens: int, console: Console, settings: Settings
) -> dict[str, object]:
    prompts = shipped_prompts()
    with tempfile.TemporaryDirectory(prefix="fleet-demo-") as tmp:
        workdir = Path(tmp)
        with console.status("preparing models"):
            models = tiny_models(workdir) if tiny else None
        if models is None:
            models = store_models(settings.home, console)
        device_ids = [f"board-{i + 1}" for i in range(devices)]
        fleet = LocalFleet(
            models=models,
            workdir=workdir,
            devices=device_ids,
            # The tiny target verifies faster than any board drafts, so adaptive k would rightly
            # hand every session to the server: the tiny demo drafts at fixed k to show drafting.
            server=ServerSettings(
                k_max=settings.server.k_max,
                linear_kernel=settings.server.linear_kernel,
                max_sessions=max(16, len(prompts)),
                speculation="fixed" if tiny else settings.server.speculation,
            ),
            device=DeviceSettings(max_concurrent_requests=len(prompts), k_max=settings.device.k_max, threshold=settings.device.threshold),
        )
        with console.status("starting broker, server and boards"):
            fleet.__enter__()
        try:
            started = time.monotonic()
            results = _generate_all(fleet, prompts, device_ids, max_new_tokens, console, live=not as_json)
            wall = time.monotonic() - started
        finally:
            fleet.__exit__(None, None, None)
        with console.status("checking outputs against the target alone"):
            references = reference_tokens(
                models.target_dir, [r.prompt_ids for r in results], max_new_tokens, settings.server.linear_kernel
            )
    outcomes = [
        DemoResult(
            device=r.device, request_id=r.request_id, prompt=r.prompt, text=r.text,
            tokens=r.response.tokens or [], reference=ref, response=r.response,
        )
        for r, ref in zip(results, references, strict=True)
    ]
    return _summary(outcomes, wall, models, devices)


class _Pending(BaseModel):
    device: str
    request_id: str
    prompt: str
    prompt_ids: list[int]
    text: str = ""
    response: GenerationResponse | None = None


def _generate_all(
    fleet: LocalFleet, prompts: list[Prompt], device_ids: list[str], max_new_tokens: int, console: Console, live: bool
) -> list[_Pending]:
    tokenizer = next(iter(fleet.agents.values())).tokenizer
    pending = [
        _Pending(
            device=device_ids[i % len(device_ids)],
            request_id=new_request_id(),
            prompt=p.prompt,
            prompt_ids=tokenizer.encode(p.prompt).ids,
        )
        for i, p in enumerate(prompts)
    ]

    def one(item: _Pending) -> None:
        def on_delta(delta: str) -> None:
            item.text += delta

        request = GenerationRequest(request_id=item.request_id, prompt=item.prompt, max_new_tokens=max_new_tokens)
        item.response = fleet.app.generate(item.device, request, on_delta=on_delta)

    with ThreadPoolExecutor(max_workers=len(pending)) as pool:
        futures = [pool.submit(one, item) for item in pending]
        if live:
            with Live(_stream_table(pending), console=console, refresh_per_second=8) as view:
                while not all(f.done() for f in futures):
                    time.sleep(0.125)
                    view.update(_stream_table(pending))
                view.update(_stream_table(pending))
        for future in futures:
            future.result()
    return pending


def _stream_table(pending: list[_Pending]) -> Table:
    table = Table(title="generations (streaming)", expand=True)
    table.add_column("board", no_wrap=True)
    table.add_column("prompt", max_width=28, no_wrap=True)
    table.add_column("text so far", overflow="fold")
    table.add_column("state", no_wrap=True)
    for item in pending:
        state = "…" if item.response is None else (item.response.reason or "done")
        tail = item.text[-160:].replace("\n", "⏎")
        table.add_row(item.device, item.prompt.replace("\n", "⏎"), tail, state)
    return table


def _summary(outcomes: list[DemoResult], wall: float, models: FleetModels, devices: int) -> dict[str, object]:
    stats = [o.response.stats for o in outcomes if o.response.stats is not None]
    tokens = sum(s.tokens for s in stats)
    drafted = sum(s.drafted for s in stats)
    accepted = sum(s.accepted for s in stats)
    verifications = sum(s.verifications for s in stats)
    errors = [o.response.error for o in outcomes if o.response.error]
    return {
        "requests": len(outcomes),
        "devices": devices,
        "target": models.target_name,
        "draft": models.draft_dir.name,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 3) if wall > 0 else 0.0,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "mean_accepted_length": round(accepted / verifications, 4) if verifications else 0.0,
        "verifications": verifications,
        "lossless": not errors and all(o.lossless for o in outcomes),
        "mismatches": [o.request_id for o in outcomes if not o.lossless],
        "errors": errors,
        "outputs": [{"device": o.device, "prompt": o.prompt, "text": o.text} for o in outcomes],
    }


def summary_table(summary: dict[str, object]) -> Table:
    table = Table(title="fleet demo summary")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("requests", "devices", "target", "draft", "tokens", "wall_s", "throughput_tok_s",
                "acceptance_rate", "mean_accepted_length", "verifications", "lossless"):
        table.add_row(key, str(summary[key]))
    return table
