"""slt: strong-lottery-ticket search with edge-popup inside random sparse source networks.

The library in six functions (docs/api.md):

    import slt
    cfg = slt.load_config("mnist_lenet.toml", {"source.density": 0.2})
    result = slt.search(cfg, out="runs")          # run dir, summary, .ticket
    ticket = slt.load_ticket(result.run_dir / "ticket.slt")
    model = ticket.to_module()                     # plain torch.nn layers
    slt.evaluate(ticket).test_acc
    slt.sweep("demo_sweep.toml", out="runs/demo"); slt.report("runs/demo")

`import slt` stays light (no torch until a function is called); errors are
`slt.errors.SltError` subclasses, whose message is what the CLI prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["evaluate", "load_config", "load_ticket", "report", "search", "sweep"]

if TYPE_CHECKING:
    from slt.api import evaluate, load_config, load_ticket, report, search, sweep


def __getattr__(name: str) -> Any:
    """The API functions, imported from slt.api on first use (PEP 562)."""
    if name in __all__:
        from slt import api

        return getattr(api, name)
    raise AttributeError(f"module 'slt' has no attribute {name!r}")
