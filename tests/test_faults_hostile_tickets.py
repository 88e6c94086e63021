"""Hostile tickets: a header rewritten with its checksum recomputed is data, never a memory
bomb. Every malformed field is one `TicketError` line naming the file and the field, from
the API and from `slt eval`, `slt export` and `slt report`, under a memory cap."""

from __future__ import annotations

import functools
import hashlib
import json
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import slt
from slt import resolve, ticket
from slt.engine.run import run_search
from slt.errors import TicketError
from slt.rundir import MAGIC
from tests.conftest import REPO, TINY

BOMB_BYTES = 7.9e9  # what the 50,000 x 50,000 layer below would make slt allocate
START = len(MAGIC) + 8


def quiet(_: str) -> None:
    pass


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a ticket file's bytes (layout: slt.ticket's docstring)."""
    (length,) = struct.unpack("<Q", raw[len(MAGIC):START])
    return json.loads(raw[START:START + length]), raw[START + length:-32]


def seal(head: bytes, payload: bytes, length: int | None = None) -> bytes:
    """A ticket file around a header's bytes, with a valid checksum (as anyone can make)."""
    body = MAGIC + struct.pack("<Q", len(head) if length is None else length) + head + payload
    return body + hashlib.sha256(body).digest()


@dataclass(frozen=True)
class Replace:
    """What an edit returns to put another JSON value in the header's place."""

    header: Any


def craft(src: Path, dst: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """Copy ticket `src` to `dst` with its header changed in place by `edit` (or replaced,
    when it returns a `Replace`) and the checksum recomputed."""
    header, payload = split(src.read_bytes())
    replaced = edit(header)
    header = replaced.header if isinstance(replaced, Replace) else header
    dst.write_bytes(seal(json.dumps(header).encode(), payload))
    return dst


@pytest.fixture(scope="module")
def tickets(tmp_path_factory) -> dict[str, Path]:
    """A plain and an embedded-weights ticket of one tiny run (MLP 8 -> 16 -> 16 -> 3)."""
    root = tmp_path_factory.mktemp("tickets")
    cfg = resolve.load("quick.toml", TINY)
    result = run_search(cfg, root / "runs", log=quiet)
    plain = root / "plain.slt"
    shutil.copy(result.run_dir / "ticket.slt", plain)
    embedded = root / "embedded.slt"
    shutil.copy(plain, embedded)
    ticket.embed_weights(embedded)
    return {"plain": plain, "embedded": embedded, "run_dir": result.run_dir}


def layer(i: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda h: h["layers"][i].__setitem__(key, value)


def top(key: str, value: Any) -> Callable[[dict], None]:
    return lambda h: h.__setitem__(key, value)


def drop_weights(h: dict) -> None:
    for row in h["layers"]:
        row["weight"] = None


def add_buffer(h: dict) -> None:
    h["buffers"].append({"name": "1.running_mean", "shape": [16], "offset": 0, "length": 64})


def rename(h: dict) -> None:
    h["layers"][1]["name"] = "evil"


def swap_spans(h: dict) -> None:
    a, b = h["layers"][0], h["layers"][1]
    a["source"], b["source"] = b["source"], a["source"]


def set_config(section: str, key: str, value: Any) -> Callable[[dict], None]:
    return lambda h: h["config"][section].__setitem__(key, value)


BOMB = [50_000, 50_000]


def bomb_config(h: dict) -> None:
    """The bomb with a config that asks for it too: the spans must then hold 2 x 312 MB."""
    h["config"]["model"]["hidden"] = BOMB
    h["layers"][1]["shape"] = BOMB
# (id, which ticket, edit, words the one line holds)
CASES: list[tuple[str, str, Callable[[dict], Any], str]] = [
    ("bomb-50000x50000", "plain", layer(1, "shape", BOMB), "layers[1].shape"),
    ("bomb-embedded", "embedded", layer(1, "shape", BOMB), "layers[1].shape"),
    ("bomb-with-config", "plain", bomb_config, "layers[0].shape"),
    ("shape-mismatch", "plain", layer(0, "shape", [8, 16]), "layers[0].shape"),
    ("shape-string", "plain", layer(0, "shape", "16x8"), "layers[0].shape"),
    ("shape-negative", "plain", layer(0, "shape", [-16, -8]), "layers[0].shape"),
    ("span-negative", "plain", layer(0, "source", [-16, 16]), "layers[0].source"),
    ("span-huge", "plain", layer(0, "ticket", [2 ** 62, 16]), "layers[0].ticket"),
    ("span-length-huge", "plain", layer(0, "ticket", [16, 2 ** 40]), "layers[0].ticket"),
    ("span-out-of-payload", "plain", layer(2, "ticket", [105, 6]), "layers[2].ticket"),
    ("span-overlap", "plain", layer(1, "ticket", [32, 32]), "overlap"),
    ("span-swapped", "plain", swap_spans, "layers[0].source"),
    ("span-string", "plain", layer(0, "source", ["0", "16"]), "layers[0].source"),
    ("span-not-a-list", "plain", layer(0, "source", {"offset": 0}), "layers[0].source"),
    ("layers-missing-one", "plain", lambda h: h["layers"].pop(), "layers"),
    ("layers-extra", "plain", lambda h: h["layers"].append(dict(h["layers"][2])), "layers"),
    ("layers-not-a-list", "plain", top("layers", {"0": 1}), "layers"),
    ("layer-not-a-dict", "plain", lambda h: h["layers"].__setitem__(0, 5), "layers[0]"),
    ("name-not-a-string", "plain", layer(0, "name", None), "layers[0].name"),
    ("layer-renamed", "plain", rename, "layers[1].name"),
    ("index-wrong", "plain", layer(1, "index", 7), "layers[1].index"),
    ("index-string", "plain", layer(1, "index", "1"), "layers[1].index"),
    ("searched-string", "plain", layer(0, "searched", "yes"), "layers[0].searched"),
    ("searched-flipped", "plain", layer(0, "searched", False), "layers[0].searched"),
    ("n-source-wrong", "plain", layer(0, "n_source", 65), "layers[0].n_source"),
    ("n-source-string", "plain", layer(0, "n_source", "64"), "layers[0].n_source"),
    ("n-ticket-wrong", "plain", layer(0, "n_ticket", 31), "n_ticket 31"),
    ("n-ticket-negative", "plain", layer(0, "n_ticket", -1), "layers[0].n_ticket"),
    ("embedded-without-weights", "embedded", drop_weights, "layers[0].weight"),
    ("weights-without-flag", "embedded", top("embedded_weights", False), "layers[0].weight"),
    ("embedded-flag-string", "plain", top("embedded_weights", "true"), "embedded_weights"),
    ("weight-span-short", "embedded",
     lambda h: h["layers"][0]["weight"].__setitem__(1, 4), "layers[0].weight"),
    ("buffer-extra", "plain", add_buffer, "buffers"),
    ("buffers-not-a-list", "plain", top("buffers", "none"), "buffers"),
    ("metrics-nan", "plain", lambda h: h["metrics"].__setitem__("test_acc", float("nan")),
     "metrics.test_acc"),
    ("metrics-inf", "plain", lambda h: h["metrics"].__setitem__("test_loss", float("inf")),
     "metrics.test_loss"),
    ("metrics-string", "plain", lambda h: h["metrics"].__setitem__("test_acc", "0.99"),
     "metrics.test_acc"),
    ("metrics-acc-above-1", "plain", lambda h: h["metrics"].__setitem__("test_acc", 7.0),
     "metrics.test_acc"),
    ("metrics-not-a-dict", "plain", top("metrics", [0.5]), "metrics"),
    ("densities-string", "plain",
     lambda h: h["densities"].__setitem__("n_source", "216"), "densities.n_source"),
    ("densities-lie", "plain",
     lambda h: h["densities"].__setitem__("n_ticket", 10 ** 12), "densities.n_ticket"),
    ("densities-not-a-dict", "plain", top("densities", 3), "densities"),
    ("torch-not-a-string", "plain", top("torch", 2.15), "torch"),
    ("sha-short", "plain", top("weights_sha256", "abc"), "weights_sha256"),
    ("sha-number", "plain", top("weights_sha256", 12), "weights_sha256"),
    ("spec-string", "plain", lambda h: h["spec"].__setitem__("shape", "8"), "spec.shape"),
    ("spec-huge", "plain", lambda h: h["spec"].__setitem__("shape", [2 ** 62]), "spec.shape"),
    ("spec-classes-zero", "plain",
     lambda h: h["spec"].__setitem__("num_classes", 0), "spec.num_classes"),
    ("spec-not-a-dict", "plain", top("spec", [8]), "spec"),
    ("config-not-a-dict", "plain", top("config", "mlp"), "config"),
    ("config-bad-key", "plain", set_config("model", "depth", 9), "config"),
    ("config-bad-value", "plain", set_config("model", "width", -1), "config"),
    # a model not registered here is a plug-in's, not a malformed field: see the plug-in tests
    ("header-not-a-dict", "plain", lambda h: Replace([h]), "header"),
    ("format-wrong", "plain", top("format", 99), "format"),
    ("format-true", "plain", top("format", True), "format"),
]


def crafted(tickets: dict[str, Path], tmp_path: Path, case_id: str) -> tuple[Path, str]:
    for cid, which, edit, words in CASES:
        if cid == case_id:
            return craft(tickets[which], tmp_path / f"{cid}.slt", edit), words
    raise KeyError(case_id)


def one_line(message: str, path: Path, words: str) -> None:
    """One line naming the file and, elsewhere than in the file's name, the field."""
    assert "\n" not in message.strip(), message
    assert str(path) in message and words in message.replace(str(path), ""), message
    assert "Traceback" not in message


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_every_malformed_field_is_one_ticket_error(tickets, tmp_path, case_id) -> None:
    path, words = crafted(tickets, tmp_path, case_id)
    with pytest.raises(TicketError) as info:
        slt.load_ticket(path)
    one_line(str(info.value), path, words)


def test_the_originals_load_and_masks_agree(tickets) -> None:
    for which in ("plain", "embedded"):
        t = slt.load_ticket(tickets[which])
        assert [tl.shape for tl in t.layers] == [(16, 8), (16, 16), (3, 16)]
        assert [tl.n_source for tl in t.layers] == [64, 128, 24]
        assert (t.layers[0].weight is not None) == (which == "embedded")


def test_a_huge_header_length_is_one_line(tickets, tmp_path) -> None:
    raw = tickets["plain"].read_bytes()
    header, payload = split(raw)
    head = json.dumps(header).encode()
    for length in (2 ** 63, len(head) + len(payload) + 1):
        bad = tmp_path / f"len{length}.slt"
        bad.write_bytes(seal(head, payload, length))
        with pytest.raises(TicketError) as info:
            ticket.load(bad)
        one_line(str(info.value), bad, "header length")


def test_a_header_that_is_not_json_or_too_deep_is_one_line(tickets, tmp_path) -> None:
    _, payload = split(tickets["plain"].read_bytes())
    for name, head in (("garbage", b"\xff\xfe{not json"), ("deep", b"[" * 100_000)):
        bad = tmp_path / f"{name}.slt"
        bad.write_bytes(seal(head, payload))
        with pytest.raises(TicketError) as info:
            ticket.load(bad)
        one_line(str(info.value), bad, "header")


def _masks_edit(tickets: dict[str, Path], tmp_path: Path, flip: Callable[[bytearray, dict], None]
                ) -> Path:
    header, payload = split(tickets["plain"].read_bytes())
    data = bytearray(payload)
    flip(data, header)
    bad = tmp_path / "masks.slt"
    bad.write_bytes(seal(json.dumps(header).encode(), bytes(data)))
    return bad


def test_masks_that_disagree_with_their_counts_are_malformed(tickets, tmp_path) -> None:
    def one_more_source_edge(data: bytearray, h: dict) -> None:
        offset = h["layers"][0]["source"][0]
        for i in range(offset, offset + h["layers"][0]["source"][1]):
            if data[i] != 0xFF:  # turn on one absent edge of layer 0's source
                data[i] |= (~data[i] & 0xFF) & -(~data[i] & 0xFF)
                return

    bad = _masks_edit(tickets, tmp_path, one_more_source_edge)
    with pytest.raises(TicketError) as info:
        ticket.load(bad)
    one_line(str(info.value), bad, "layers[0].source")


def test_a_ticket_edge_outside_its_source_is_malformed(tickets, tmp_path) -> None:
    def move_one_ticket_edge(data: bytearray, h: dict) -> None:
        src, tck = h["layers"][0]["source"], h["layers"][0]["ticket"]
        for i in range(src[1]):  # clear one ticket edge, set one outside the source
            s, t = data[src[0] + i], data[tck[0] + i]
            if t and (~s & 0xFF):
                data[tck[0] + i] = (t & (t - 1)) | ((~s & 0xFF) & -(~s & 0xFF))
                return

    bad = _masks_edit(tickets, tmp_path, move_one_ticket_edge)
    with pytest.raises(TicketError) as info:
        ticket.load(bad)
    one_line(str(info.value), bad, "layers[0].ticket")


# --- the command line, under a memory cap --------------------------------------------------


@functools.cache
def mem_cap() -> int:
    """Address space for the capped commands: what importing slt with torch and torchvision
    maps here (3.0 to 4.4 GiB, by torch build), plus 1 GiB to work in; well below the bomb."""
    probe = subprocess.run([sys.executable, "-c", (
        "import pathlib, slt.api, slt.cli, slt.export, slt.ticket, torchvision\n"
        "for line in pathlib.Path('/proc/self/status').read_text().splitlines():\n"
        "    if line.startswith('VmSize:'): print(int(line.split()[1]) * 1024)")],
        capture_output=True, text=True, check=True, cwd=REPO)
    cap = int(probe.stdout.split()[-1]) + 2**30
    assert cap < BOMB_BYTES - 2**30, f"importing slt takes {cap} bytes: a cap proves nothing"
    return cap


def cap_memory(cap: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def slt_capped(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    cap = functools.partial(cap_memory, mem_cap())  # measured here: the child only sets it
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, text=True,
                          capture_output=True, preexec_fn=cap, timeout=120)


def assert_one_error(proc: subprocess.CompletedProcess[str], path: Path, words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("slt: error: "), proc.stderr[-2000:]
    assert str(path) in lines[0] and words in lines[0].replace(str(path), ""), lines[0]
    assert proc.stdout == ""


def test_a_good_ticket_exports_under_the_memory_cap(tickets, tmp_path) -> None:
    out = tmp_path / "good.pt"
    proc = slt_capped("export", str(tickets["plain"]), "--format", "state_dict", "--out",
                      str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 0


@pytest.mark.parametrize("case_id", ["bomb-50000x50000", "bomb-embedded", "bomb-with-config",
                                     "span-length-huge", "spec-huge"])
def test_export_of_a_bomb_is_one_line_and_writes_nothing(tickets, tmp_path, case_id) -> None:
    path, words = crafted(tickets, tmp_path, case_id)
    out = tmp_path / "out.pt"
    proc = slt_capped("export", str(path), "--format", "state_dict", "--out", str(out))
    assert_one_error(proc, path, words)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("case_id", ["bomb-50000x50000", "metrics-nan", "layer-renamed",
                                     "embedded-without-weights", "config-bad-value"])
def test_eval_of_a_crafted_ticket_is_one_line(tickets, tmp_path, case_id) -> None:
    path, words = crafted(tickets, tmp_path, case_id)
    before = path.read_bytes()
    proc = slt_capped("eval", str(path))
    assert_one_error(proc, path, words)
    assert path.read_bytes() == before


@pytest.fixture(scope="module")
def report_of_a_bomb(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """`slt report` (capped) over a dense run and a sparser one, whose ticket header is the
    50,000 x 50,000 bomb: the survival and overlap tables read both tickets. Made once for
    the module: its tests only read what the report wrote."""
    runs = tmp_path_factory.mktemp("bomb_report") / "runs"
    for density in ("1.0", "0.5"):
        cfg = resolve.load("quick.toml", [*TINY, f"source.density={density}"])
        result = run_search(cfg, runs, log=quiet)
    bomb = result.run_dir / "ticket.slt"
    craft(bomb, bomb, layer(1, "shape", BOMB))
    return slt_capped("report", str(runs), "--no-eval"), runs, bomb


def test_report_over_a_crafted_ticket_stays_bounded(report_of_a_bomb) -> None:
    proc, runs, bomb = report_of_a_bomb
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    text = (runs / "report" / "report.md").read_text()
    assert "| d=0.5 | – | – |" in text  # the crafted ticket's overlap is not computed


def test_report_names_a_crafted_ticket(report_of_a_bomb) -> None:
    proc, runs, bomb = report_of_a_bomb
    text = (runs / "report" / "report.md").read_text()
    assert "layers[1].shape" in text and bomb.parent.name in text, text


# --- an override that changes the network is named, not torch -----------------------------


@pytest.mark.parametrize(("override", "what"), [
    ("run.seed=5", "weights"), ("model.init=kaiming_normal", "weights"),
    ("source.density=0.3", "source masks"), ("model.hidden=[32, 16]", "the network's layers"),
    ("model.width=100000", "the network's layers"),
])
def test_an_override_that_changes_the_network_is_named(tickets, override, what) -> None:
    with pytest.raises(TicketError) as info:
        slt.evaluate(tickets["plain"], overrides=[override])
    message = str(info.value)
    key = override.split("=")[0]
    assert message.startswith(what) and "regenerated from the config differ" in message, message
    assert f"the override {key}=" in message and "changed the network" in message, message
    assert "torch" not in message and "\n" not in message


def test_an_override_that_keeps_the_network_still_evaluates(tickets) -> None:
    recorded = slt.load_ticket(tickets["plain"]).metrics["test_acc"]
    result = slt.evaluate(tickets["plain"], overrides=["search.eval_batch_size=7"])
    assert result.test_acc == recorded


def test_same_torch_without_override_does_not_blame_the_torch_version(tickets, tmp_path
                                                                      ) -> None:
    path = craft(tickets["plain"], tmp_path / "seed.slt", set_config("run", "seed", 5))
    with pytest.raises(TicketError) as info:  # a header whose seed was changed by hand
        slt.evaluate(path)
    message = str(info.value)
    assert "with the same torch" in message and "the ticket was altered" in message, message


def test_eval_with_a_seed_override_on_the_command_line(tickets) -> None:
    proc = slt_capped("eval", str(tickets["plain"]), "--set", "run.seed=5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "slt: error: weights regenerated from the config differ from the ticket's because the "
        "override run.seed=5 (the ticket's: 0) changed the network; a ticket's masks fit only "
        "the network it was found in: evaluate it without that override"]


# --- a ticket of a plug-in's model, read where the plug-in is not installed ----------------


def plugin_model(h: dict) -> None:
    h["config"]["model"]["name"] = "labmlp"  # registered on the machine that searched it


def test_a_plugin_models_ticket_reads_where_the_plugin_is_not(tickets, tmp_path) -> None:
    """`slt report` on another machine reads masks without the model's code: the header's
    own layout is checked for types and ranges, its spans against the file."""
    original = ticket.load(tickets["plain"])
    t = ticket.load(craft(tickets["plain"], tmp_path / "plugin.slt", plugin_model))
    assert t.config.model.name == "labmlp"
    assert [tl.shape for tl in t.layers] == [tl.shape for tl in original.layers]
    assert all(bool((a.mask == b.mask).all()) and bool((a.source_mask == b.source_mask).all())
               for a, b in zip(t.layers, original.layers))
    proc = slt_capped("eval", str(tmp_path / "plugin.slt"))  # rebuilding needs the model
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "slt: error: unknown model 'labmlp' (did you mean 'mlp'?); " \
        "known: conv2, conv4, conv6, conv8, mlp, resnet18, resnet20, resnet50, vgg16"


def test_a_bomb_in_a_plugin_models_ticket_is_still_one_line(tickets, tmp_path) -> None:
    def edit(h: dict) -> None:
        plugin_model(h)
        h["layers"][1]["shape"] = BOMB

    path = craft(tickets["plain"], tmp_path / "plugin-bomb.slt", edit)
    assert_one_error(slt_capped("eval", str(path)), path,
                     "malformed ticket field layers[1].source: spans")
