"""Search a ticket, look at it, export it, and fine-tune it with plain PyTorch.

The walk-through of docs/api.md as one script: offline (the synthetic planted-teacher task
of the packaged quick.toml), about half a minute on a laptop CPU.

    python examples/search_export_finetune.py [--out runs/example]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slt
from slt.data import open_batches
from slt.export import export, load_state_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example", help="folder of run directories")
    out = Path(parser.parse_args().out)

    # 1. Search: a config (packaged name, path, Config or dict) and overrides.
    cfg = slt.load_config("quick.toml", {"source.density": 0.5, "search.ticket_density": 0.1,
                                         "search.epochs": 3})
    result = slt.search(cfg, out=out)
    print(f"{result.status}: {result.run_dir.name}, test acc "
          f"{result.summary['final_test_acc']:.4f}")

    # 2. The ticket: per-layer densities of the source and of the ticket.
    ticket = slt.load_ticket(result.run_dir / "ticket.slt")
    for layer in ticket.layers:
        total = layer.mask.numel()
        print(f"  {layer.name:12s} {tuple(layer.shape)!s:14s} source "
              f"{layer.n_source / total:.3f}  ticket {int(layer.mask.sum()) / total:.3f}")
    print(f"  measured again: {slt.evaluate(ticket).test_acc:.4f}")

    # 3. Export: a plain state dict, dense and with the masked weights as sparse CSR.
    dense = export(ticket, out / "ticket_state.pt", "state_dict")
    sparse = export(ticket, out / "ticket_state_sparse.pt", "state_dict", sparse=True)
    print(f"  exported: {dense} bytes dense, {sparse} bytes sparse")

    # 4. Fine-tune the ticket as an ordinary module for one epoch, with plain PyTorch.
    model = ticket.to_module()
    model.load_state_dict(load_state_dict(out / "ticket_state_sparse.pt"))  # the same weights
    data = open_batches(ticket.config.data, "cpu")  # inputs normalised as the search saw them
    train = TensorDataset(data.normalise(data.splits.train_x), data.splits.train_y)
    test_x, test_y = data.normalise(data.splits.test_x), data.splits.test_y
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in DataLoader(train, batch_size=128, shuffle=True,
                           generator=torch.Generator().manual_seed(0)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"  after one epoch of fine-tuning (every weight free): test acc {acc:.4f}")


if __name__ == "__main__":
    main()
