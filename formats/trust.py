"""The one trust decision: what counts as code from the file, and the flag that allows it.

A model file is data until the user says otherwise.  "Code from the file" is
anything whose behaviour the file chooses:

- unpickling a global outside nnconv's allowlists (:mod:`.pickle_gate`);
- TorchScript: ``torch.jit.load`` compiles and runs the archive's own code
  (``__setstate__``, methods), so its weights are read by nnconv's restricted
  reader (``formats/pt/torchscript.py``) and running it needs trust;
- a ``torch.export`` ``.pt2`` program: ``torch.export.load`` evaluates the file's shape
  expressions (``sympy.sympify``) and guard code and unpickles its sample inputs, so
  its weights are read as data (``formats/pt2/``) and running it needs trust;
- importing a class an architecture record names, or calling any constructor
  other than the torch.nn built-ins of :data:`NN_BUILTINS`;
- custom code a model folder ships (Hugging Face ``auto_map``), when it is read.

None of it happens unless the caller passes ``trust_code=True`` (the CLI's
``--trust-code``, alias ``--trust-pickle``), which nothing ever implies; the
CLI prints it in the summary and ``verify`` records it in its JSON report.
The user's own ``--model`` class is the user's code, not the file's.
"""

from __future__ import annotations

from os import PathLike

from .errors import UntrustedCodeError
from .pickle_gate import MODULE_ALLOWED

FLAG = "--trust-code"
# torch.nn built-in classes nnconv instantiates or unpickles without trust, by import path.
NN_BUILTINS: frozenset[str] = frozenset(
    n for n in MODULE_ALLOWED if n.startswith("torch.nn.modules.")
)


def refuse(
    subject: str | PathLike[str] | None, what: str, *, names: list[str] = ()
) -> UntrustedCodeError:
    """The error for "doing this would run ``what`` from the file"; ``names`` lists the
    classes or globals concerned."""
    shown = f": {', '.join(sorted(set(names)))}" if names else ""
    return UntrustedCodeError(
        subject,
        f"{what}{shown}",
        value=sorted(set(names)) or None,
        remedy=f"pass {FLAG} only if you trust this file: it lets the file run code",
    )
