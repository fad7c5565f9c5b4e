"""The doctor's vocabulary: one :class:`Check` per question, a :class:`Report` of them, text and JSON renderings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from facellm_edge.errors import FaceLLMEdgeError

SCHEMA = "facellm-edge-doctor/1"
OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"


@dataclass(frozen=True)
class DoctorConfig:
    """What the user asked the doctor to check beyond the machine itself (each one that cannot work fails)."""

    bundle: str | None = None  # a bundle to load with every sha256 checked
    cameras: tuple[int, ...] = ()  # camera indices to open (one frame read from each)
    scan_cameras: bool = False  # open every camera device found (else they are only listed)
    device: str | None = None  # --device of ask/run: its ONNX Runtime provider must initialise
    detector: str | None = None  # --detector of ask/run: its backend must be installed


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | info | warn | fail
    summary: str  # one line
    notes: tuple[str, ...] = ()  # more lines: what a feature means, how to fix a warning
    data: dict[str, Any] = field(default_factory=dict)  # the same facts for --json
    exit_code: int = 0  # for a failure: the exit code of the error it stands for (3 input, 6 runtime, 7 extra)


class DoctorError(FaceLLMEdgeError):
    """Something the user asked for cannot work; the exit code is the first failure's."""

    def __init__(self, failures: list[Check]) -> None:
        super().__init__(f"doctor: {len(failures)} problem{'s' if len(failures) > 1 else ''}: "
                         + "; ".join(f"{c.name}: {c.summary}" for c in failures))
        self.exit_code = failures[0].exit_code or 1


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "ok": not self.failures,
                "checks": [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(c).items()}
                           for c in self.checks]}

    def to_text(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = []
        for c in self.checks:
            lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.summary}")
            lines += [f"{'':<4}  {'':<{width}}    {note}" for note in c.notes]
        failures = self.failures
        lines.append(f"{len(failures)} problem{'' if len(failures) == 1 else 's'}" if failures else "no problems")
        return "\n".join(lines)


def guarded(name: str, fn: Callable[[], Check]) -> Check:
    """Run one check; an error it did not expect becomes a failed check (the other checks still run)."""
    try:
        return fn()
    except FaceLLMEdgeError as exc:
        return Check(name, FAIL, str(exc), exit_code=exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Check(name, FAIL, f"{type(exc).__name__}: {first}", exit_code=1)

