"""The int8 artifact of a checkpoint: where it lives, what its report says, and whether it may be served.

`sentiment model quantize` (`model_store.quantize`) writes it: the quantized graph (`model.onnx` for
ONNX Runtime, `model.xml` and `model.bin` for OpenVINO, by its recipe) and `report.json`, the
accuracy it keeps against fp32 on labelled sentences and its speed on this CPU. By
default it sits in `int8/` inside the model directory (a folder: the checkpoint's fingerprint reads
only the files beside `config.json`, so the artifact leaves the model's version as it is). Nothing
here imports a framework: the worker reads the report before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DIR = "int8"  # inside the model directory, unless SENTIMENT_INT8_DIR names another
# How `model_store.quantize` may make it, and the runtime that serves each recipe's graph.
RUNTIMES = {"dynamic": "onnxruntime", "split": "onnxruntime", "openvino": "openvino"}
RECIPES = tuple(RUNTIMES)
MODEL_FILES = {"onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.bin")}  # the graph first
REPORT_FILE = "report.json"
# The adoption rule for a faster precision (docs/tuning.md, "Precision").
MAX_ACCURACY_DROP = 0.005
MIN_AGREEMENT = 0.99


def file_digest(*paths: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# The CPU instructions an artifact's figures depend on: those that multiply int8 (AVX2's products can
# saturate, VNNI's and AMX's cannot) and bf16 (where the float engine `auto` serves is bf16).
INSTRUCTIONS = ("avx2", "avx_vnni", "avx512_vnni", "amx_int8", "avx512_bf16", "amx_tile")
NATIVE_BF16 = ("avx512_bf16", "amx_tile")  # as torch reads it (`engine.native_bf16`)


def cpu_instructions() -> str:
    """This CPU's `INSTRUCTIONS` (`/proc/cpuinfo`'s flags): an artifact's figures hold for CPUs of
    the same set (docs/tuning.md "Precision")."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(f for f in INSTRUCTIONS if f in flags) or "none of avx2, vnni, amx, bf16"


def multiplies_bf16(instructions: str) -> bool:
    """Whether a CPU of these `cpu_instructions` multiplies bf16 natively: `auto`'s float engine there is bf16."""
    return any(flag in instructions.split() for flag in NATIVE_BF16)


@dataclass(frozen=True)
class Report:
    """What `sentiment model quantize` measured, written beside the graph as `report.json`."""

    checkpoint: str  # the fingerprint of the checkpoint it was made from
    artifact: str  # `file_digest` of its graph's files (`MODEL_FILES`)
    tool: str  # e.g. "onnxruntime 1.32.0"
    cpu: str  # the instructions of the CPU it was measured on (`cpu_instructions`)
    recipe: str  # one of RECIPES
    method: str  # what was quantized, and how
    kept_float: list[str]  # the graph's MatMul/Gemm nodes left in float (ONNX Runtime's recipes)
    calibration: dict[str, Any]  # the sentences the recipe was chosen on: file, count, digest
    evaluation: dict[str, Any]  # the labelled sentences of the figures below: file, count, digest
    fp32_accuracy: float
    int8_accuracy: float
    agreement: float  # the share of sentences whose top label is fp32's
    largest_score_difference: float  # over every sentence and label, the model's own scores
    speedup: float  # fp32's time over the evaluation sentences (ONNX Runtime, batches of 32) over its own
    tried: dict[str, dict[str, Any]]  # every recipe made: passes, agreement, int8_accuracy, speedup
    rule: dict[str, float] = field(
        default_factory=lambda: {"max_accuracy_drop": MAX_ACCURACY_DROP, "min_agreement": MIN_AGREEMENT}
    )
    bf16_speedup: float | None = None  # torch bf16's time over its own, where `cpu` multiplies bf16 natively

    @property
    def float_speedup(self) -> float | None:
        """Its speed over the float engine `auto` serves on a CPU of its `cpu`: torch bf16 where that
        multiplies bf16 natively, else ONNX Runtime's fp32; None where that was not measured."""
        return self.bf16_speedup if multiplies_bf16(self.cpu) else self.speedup

    @property
    def passes(self) -> bool:
        """The adoption rule: accuracy within 0.5 point of fp32, and >= 99% of the labels agreeing."""
        return self.fp32_accuracy - self.int8_accuracy <= MAX_ACCURACY_DROP and self.agreement >= MIN_AGREEMENT

    @property
    def runtime(self) -> str:
        return RUNTIMES[self.recipe]

    @property
    def files(self) -> tuple[str, ...]:
        return MODEL_FILES[self.runtime]

    def summary(self) -> str:
        """The figures in one line (start-up log, the command's output)."""
        return (
            f"recipe {self.recipe}, {self.evaluation['sentences']} sentences of {self.evaluation['data']}: accuracy "
            f"{self.int8_accuracy:.2%} against fp32's {self.fp32_accuracy:.2%}, {self.agreement:.2%} of labels "
            f"agreeing, largest score difference {self.largest_score_difference:.4f}, {self.speedup:.2f}x fp32's "
            f"speed{'' if self.bf16_speedup is None else f' and {self.bf16_speedup:.2f}x bf16s'}, measured with {self.cpu}"
        )

    def write(self, directory: Path) -> None:
        (directory / REPORT_FILE).write_text(json.dumps({**asdict(self), "passes": self.passes}, indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Report:
        fields = json.loads((directory / REPORT_FILE).read_text())
        if not isinstance(fields, dict):  # (`null`, a list: `find` refuses it as it does broken JSON)
            raise TypeError(f"{REPORT_FILE} holds {type(fields).__name__}, not an object")
        fields.pop("passes", None)  # derived, written for people
        return cls(**fields)


class Refused(Exception):
    """An artifact the worker will not serve: the one line says why and what to do."""


@dataclass(frozen=True)
class Artifact:
    """An int8 artifact on disk whose report is of this checkpoint and of this graph."""

    directory: Path
    report: Report

    @property
    def model(self) -> Path:
        """The graph its runtime loads (OpenVINO finds the weights beside it)."""
        return self.directory / self.report.files[0]

    @property
    def tag(self) -> str:
        """What the cache version says of its scores: another artifact (recipe, calibration, tool)
        scores otherwise, so each has its own."""
        return f"int8-{self.report.artifact[:8]}"

    @classmethod
    def find(cls, directory: Path, fingerprint: str) -> Artifact | None:
        """The artifact in `directory`; None where there is none. Raises `Refused` for one that cannot
        be trusted: a report missing or unreadable, of another checkpoint, or of another graph."""
        graphs = {name for files in MODEL_FILES.values() for name in files}
        if not any((directory / name).is_file() for name in (REPORT_FILE, *graphs)):
            return None
        remake = f"make it again with `sentiment model quantize` (int8 artifact {directory})"
        try:
            report = Report.read(directory)
        except (OSError, ValueError, TypeError) as exc:
            raise Refused(f"the int8 artifact's report cannot be read ({type(exc).__name__}: {exc}); {remake}") from exc
        if report.checkpoint != fingerprint:
            raise Refused(f"the int8 artifact was made from another checkpoint ({report.checkpoint}); {remake}")
        try:
            digest = file_digest(*(directory / name for name in report.files))
        except (OSError, KeyError):  # a file gone, or a recipe this version does not know
            digest = None
        if digest != report.artifact:
            raise Refused(f"the int8 artifact's graph is not the one its report measured; {remake}")
        return cls(directory, report)

    def not_for_here(self) -> str | None:
        """Why `auto` leaves it aside on this machine, else None: its figures were measured on a CPU
        of other instructions (accuracy and speed both change with them), or it was no faster there
        than the float engine it would replace."""
        here = cpu_instructions()
        if self.report.cpu != here:
            return (
                f"it was measured on a CPU with {self.report.cpu}, and this one has {here}: make it on this CPU kind "
                "with `sentiment model quantize` (or set SENTIMENT_PRECISION=int8 to serve it anyway)"
            )
        speedup, engine = self.report.float_speedup, "bf16" if multiplies_bf16(here) else "fp32"
        if speedup is None or speedup <= 1.0:
            measured = "was not timed against" if speedup is None else f"ran at {speedup:.2f}x"
            return f"it {measured} the {engine} engine it would replace, on this CPU kind"
        return None

    def check(self, allow_failing: bool) -> None:
        """Raise `Refused` unless the report passes the accuracy rule, or `allow_failing` says to serve it anyway."""
        if not self.report.passes and not allow_failing:
            raise Refused(
                f"the int8 artifact fails the accuracy rule ({self.report.summary()}; at most "
                f"{MAX_ACCURACY_DROP:.1%} lower, >= {MIN_AGREEMENT:.0%} agreeing); set SENTIMENT_INT8_ALLOW_FAILING=true "
                "to serve it anyway, or another SENTIMENT_PRECISION"
            )
