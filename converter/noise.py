"""The noise rule: judge outputs by the reference's own float32 error, not a fixed tolerance.

Two runtimes add up the same products in different orders, and the difference grows
with depth and magnitude: a deep segmentation net differs from onnxruntime by 6e-5 at
cosine 1.0 and fails float32's ``atol 1e-5``, while a net whose outputs are 1e-9 passes
anything under that atol.  So the reference is run once more in float64 on the same
inputs; the float32 reference's own error against that run is the yardstick of noise
every float32 run carries, and a candidate passes when its error against the float64
run is at most :data:`NOISE_RATIO` times that yardstick.  A floor of a few float32 steps
of the output's magnitude keeps a reference that happens to be exact from making the
yardstick zero.  Explicit ``--atol``/``--rtol`` and recorded casts keep the tolerance
rule.

Inputs that prove nothing are flagged (:func:`degenerate`): a reference output that is
all zero, constant, non-finite, or tiny against the parameters' scale passes any
candidate that is also zero, whatever its weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .compare import compare_outputs
from .report import OutputCheck
from .tolerances import Tolerances

if TYPE_CHECKING:
    import torch

NOISE_RATIO = 10.0  # a candidate may carry 10x the float32 reference's own error
FLOOR_STEPS = 4  # the yardstick is at least 4 float32 steps (eps * magnitude)
TINY = 1e-6  # outputs below 1e-6 x the parameters' RMS say nothing about the weights


@dataclass
class Yardstick:
    """The reference's float64 outputs and, per output, the float32 run's own error."""

    float64: dict[str, torch.Tensor]
    noise: dict[str, float]  # max |float32 - float64|, at least the floor
    scale: float  # RMS of the reference's floating parameters (0.0 when it has none)


def yardstick(runner: Any, inputs: Any, ref_out: dict, *, device: str) -> Yardstick | str:
    """Run the reference's module in float64; a reason instead when it cannot (no eager
    module, an operator without a float64 kernel, a weight used outside its module)."""
    import torch

    module = getattr(runner, "module", None)
    if module is None or isinstance(module, torch.jit.ScriptModule):
        return "the reference is not an eager torch module"
    scale = parameter_scale(runner)

    def widen(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t

    named = isinstance(inputs, Mapping)
    wide = {k: widen(t) for k, t in inputs.items()} if named else [widen(t) for t in inputs]
    try:
        try:
            with _widened(module, whole=False):
                out = runner.run(wide, device=device)
        except Exception:  # a forward that casts inputs to a weight's dtype before using it
            with _widened(module, whole=True):
                out = runner.run(wide, device=device)
    except Exception as exc:  # the rule needs float64; tolerances still judge
        return f"the reference does not run in float64 ({type(exc).__name__})"
    noise = {}
    for name, ref in ref_out.items():
        wide_ref = out.get(name)
        if wide_ref is None or not ref.is_floating_point() or wide_ref.shape != ref.shape:
            continue
        error = (ref.double() - wide_ref).abs().max().item() if ref.numel() else 0.0
        floor = FLOOR_STEPS * torch.finfo(ref.dtype).eps * wide_ref.abs().max().item()
        noise[name] = max(error, floor, torch.finfo(torch.float64).tiny)
    return Yardstick(out, noise, scale)


@contextlib.contextmanager
def _widened(module: Any, *, whole: bool) -> Iterator[None]:
    """Each module's own weights in float64 only while it runs (forward hooks), so that
    the float64 pass holds the model plus one module's weights twice over, not a float64
    copy of the whole model; or, ``whole``, every weight for the whole pass (for forwards
    that cast their inputs to a weight's dtype before calling the module that owns it,
    as ViT's embeddings do).  The float32 tensors are put back untouched."""
    import torch

    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def own(mod: Any) -> list[torch.Tensor]:
        return [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]

    def before(mod: Any, *_: Any) -> None:
        for t in own(mod):
            if t.is_floating_point() and t.dtype != torch.float64 and id(t) not in kept:
                kept[id(t)] = (t, t.data)
                t.data = t.data.double()

    def after(mod: Any, *_: Any) -> None:
        for t in own(mod):
            if id(t) in kept:
                t.data = kept.pop(id(t))[1]

    handles = [] if whole else [h for m in module.modules() for h in _hooks(m, before, after)]
    for mod in module.modules() if whole else ():
        before(mod)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for t, data in kept.values():  # a forward that raised
            t.data = data


def _hooks(mod: Any, before: Any, after: Any) -> list[Any]:
    return [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]


@dataclass(frozen=True)
class Judge:
    """Decides one output leaf: the tolerances where the user gave some or the candidate
    was cast, else the noise rule when there is a yardstick; flags degenerate outputs
    (failing them when ``strict``)."""

    tolerances: Tolerances
    strict: bool = False
    cast: bool = False

    def at_precision(self, dtype: str) -> Judge:
        return replace(self, tolerances=self.tolerances.at_precision(dtype), cast=True)

    def __call__(
        self, name: str, ref: torch.Tensor, cand: torch.Tensor, device: str, yard: Any = None
    ) -> OutputCheck:
        check = compare_outputs(name, ref, cand, tolerances=self.tolerances, device=device)
        by_noise = not (self.cast or self.tolerances.given(name))
        if yard is not None and by_noise and check.note is None:
            judge(check, name, cand, yard)
        self.flag(check, ref, yard.scale if yard is not None else 0.0)
        return check

    def flag(self, check: OutputCheck, ref: torch.Tensor, scale: float) -> None:
        check.degenerate = degenerate(ref, scale=scale)
        if check.degenerate and self.strict:
            check.passed = False


def parameter_scale(runner: Any) -> float:
    """RMS of a torch runner's floating parameters (0.0 for anything else)."""
    module = getattr(runner, "module", None)
    params = [] if module is None else [p for p in module.parameters() if p.is_floating_point()]
    return _rms(params)


def judge(check: Any, name: str, cand: torch.Tensor, yard: Yardstick) -> None:
    """Decide ``check`` (an OutputCheck whose shape and dtype matched) by the noise rule."""
    wide, noise = yard.float64.get(name), yard.noise.get(name)
    if wide is None or noise is None or not cand.is_floating_point():
        return
    error = (cand.double() - wide).abs().max().item() if cand.numel() else 0.0
    check.rule = "noise"
    check.reference_noise = noise
    check.noise_ratio = error / noise if math.isfinite(error) else math.inf
    check.passed = check.finite and check.noise_ratio <= NOISE_RATIO


def degenerate(ref: torch.Tensor, *, scale: float) -> str | None:
    """Why a reference output proves nothing about the weights, or None."""
    import torch

    if not ref.is_floating_point() or ref.numel() == 0:
        return None
    if not bool(torch.isfinite(ref).all()):
        return "non-finite"
    top = ref.abs().max().item()
    if top == 0.0:
        return "all zero"
    if ref.numel() > 1 and ref.max().item() == ref.min().item():
        return "constant"
    if scale > 0 and top < TINY * scale:
        return f"tiny: at most {top:.3g}, parameters' RMS {scale:.3g}"
    return None


def _rms(tensors: list) -> float:
    """RMS in float64, a million elements at a time (no float64 copy of a whole tensor)."""
    total, count = 0.0, 0
    for t in tensors:
        if t.numel() and t.device.type != "meta":
            for part in t.detach().reshape(-1).split(1 << 20):
                total += part.double().square().sum().item()
            count += t.numel()
    return math.sqrt(total / count) if count else 0.0
