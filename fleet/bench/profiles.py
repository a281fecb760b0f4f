"""Board profiles: how much slower (or faster) than this machine a board drafts.

Boards are not on the benchmark machine. `fleet bench` still runs the real ONNX draft here, so
the drafted tokens (and so acceptance) are real, and then waits out the rest of an emulated
step time so the server sees a board's pace: emulated step = this machine's measured draft
step time x the profile's hardware factor (`DeviceSettings.emulated_step_ms`).

The factors are ESTIMATES, not measurements on the boards: no board is reachable from here.
Each is calibrated against the machine the project develops on (2 vCPUs of an Intel Xeon
Sapphire Rapids at 2.3 GHz, where the int4 Qwen2.5-0.5B draft runs at about 50-65 tokens/s
through ONNX Runtime; DESIGN.md section 7) and reasoned from public hardware specifications,
because single-stream decoding of a 0.5B model is bound by memory bandwidth: every step reads
all weights (about 0.4 GB at int4 with a quantised embedding). On a much faster or slower host
the same factor emulates a correspondingly faster or slower board; `rationale` says what each
factor assumes so that it can be replaced by a measured one.
"""

import statistics
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# Decode steps timed (after a prefill and a few untimed steps) when measuring the draft.
MEASURE_STEPS = 32
WARMUP_STEPS = 4
MEASURE_PROMPT = "def moving_average(values, window):\n    total = 0.0\n"


class BoardProfile(BaseModel):
    """A board kind the benchmark can emulate."""

    model_config = ConfigDict(frozen=True)

    name: str
    hardware: str
    hardware_factor: float = Field(gt=0, description="board draft step time / this machine's")
    estimated_draft_tok_s: str = Field(description="what the factor implies for the int4 0.5B draft")
    rationale: str


PROFILES: dict[str, BoardProfile] = {
    profile.name: profile
    for profile in (
        BoardProfile(
            name="rpi5",
            hardware="Raspberry Pi 5 (4x Cortex-A76 at 2.4 GHz, LPDDR4X-4267 on a 32-bit bus), "
            "ONNX Runtime CPU",
            hardware_factor=3.5,
            estimated_draft_tok_s="about 15",
            rationale=(
                "Peak memory bandwidth 17 GB/s (4267 MT/s x 4 bytes), of which CPU streaming "
                "reaches roughly 60%: about 10 GB/s, so at most ~25 steps/s over 0.4 GB of int4 "
                "weights; ONNX Runtime's MatMulNBits NEON kernels are assumed to reach ~60% of "
                "that bound, ~15 tok/s, against ~52 tok/s on the development machine."
            ),
        ),
        BoardProfile(
            name="rpi4b",
            hardware="Raspberry Pi 4B (4x Cortex-A72 at 1.8 GHz, LPDDR4-3200 on a 32-bit bus), "
            "ONNX Runtime CPU",
            hardware_factor=8.0,
            estimated_draft_tok_s="about 6-7",
            rationale=(
                "Peak memory bandwidth 12.8 GB/s, of which the A72 cluster streams roughly "
                "4-6 GB/s, and no int8 dot-product instructions (ARMv8.0): about 10 steps/s at "
                "the bandwidth bound, assumed ~65% of it in practice."
            ),
        ),
        BoardProfile(
            name="jetson-orin-nano",
            hardware="NVIDIA Jetson Orin Nano 8 GB (Ampere GPU, 1024 CUDA cores, LPDDR5 "
            "68 GB/s shared), onnxruntime-gpu CUDA provider",
            hardware_factor=1.0,
            estimated_draft_tok_s="about 50-60",
            rationale=(
                "68 GB/s would allow ~150 steps/s over 0.4 GB of weights, but at batch 1 a "
                "24-layer decoder launches several hundred small kernels per step, and public "
                "single-stream llama.cpp CUDA results on this board are ~50 tok/s for ~1B "
                "models at 4 bits; ONNX Runtime's CUDA provider is assumed to land at about the "
                "development machine's CPU speed for the 0.5B draft."
            ),
        ),
    )
}


def get_profile(name: str) -> BoardProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown board profile {name!r}; known: {', '.join(PROFILES)}") from None


def measure_draft_step_ms(draft_dir: Path, steps: int = MEASURE_STEPS) -> float:
    """Median milliseconds of one greedy decode step of the exported draft on this machine.

    The median of many single-token steps, after a prefill and untimed warm-up steps: what a
    board pays per drafted token, least disturbed by other load on a shared machine.
    """
    from device.runner import DraftRunner

    if steps < 1:
        raise ValueError("steps must be at least 1")
    runner = DraftRunner(draft_dir)
    logits = runner.prefill(runner.tokenizer.encode(MEASURE_PROMPT).ids)
    timings = []
    for index in range(WARMUP_STEPS + steps):
        token = int(logits.argmax())
        started = time.perf_counter()
        logits = runner.step(token)
        if index >= WARMUP_STEPS:
            timings.append(1000 * (time.perf_counter() - started))
    return statistics.median(timings)
