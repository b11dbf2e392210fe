"""Reading checkpoints: the one reader of ``.pth`` files, and published weights.

:func:`read_checkpoint` opens any checkpoint cribo reads (a run's
``checkpoint.pth``, ``teacher_backbone.pth``, published DINO / CrIBo files) and
explains an unreadable one in one line; :func:`load_pretrained` builds a ViT
(and the CrIBo head when present) from published weights::

    teacher, report = load_pretrained("cribo_vits16_coco.pth")
    print(report)
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from .architectures import HEAD_DIM
from .backbone import VisionTransformer

__all__ = ["LoadReport", "load_pretrained", "read_checkpoint"]

#: Prefixes the published checkpoints put in front of backbone keys: DDP's
#: ``module.``, the multi-crop wrapper's ``backbone.``, torch.compile's ``_orig_mod.``.
_PREFIXES = ("module.", "backbone.", "_orig_mod.")
#: Keys (after the prefixes) of the projection head, which a backbone skips.
_HEAD_PREFIX = "head."


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        source: The checkpoint path, or ``"<state dict>"``.
        entry: The checkpoint entry used (e.g. ``"teacher"``), None for a bare state dict.
        config: The architecture of the model loaded into.
        loaded: Model keys filled from the checkpoint.
        missing: Model keys the checkpoint lacks (left as they were).
        unexpected: Checkpoint keys (prefixes stripped) the model lacks (ignored).
        mismatched: ``(key, checkpoint shape, model shape)`` for keys of different shapes (ignored).
        skipped: Head keys (``head.*``) deliberately left out.
    """

    source: str
    entry: str | None
    config: dict[str, Any]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and nothing else was in the checkpoint."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        where = self.source + (f" [{self.entry!r}]" if self.entry else " (bare state dict)")
        arch = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "drop_path_rate")
        lines = [f"load_pretrained: {where}",
                 f"  architecture: {arch}",
                 f"  loaded {len(self.loaded)} tensors" +
                 (f"; skipped {len(self.skipped)} head tensors" if self.skipped else "")]
        if self.ok:
            lines.append("  all model keys loaded, none unexpected")
        for title, names in (("missing (left as initialised)", self.missing),
                             ("unexpected (ignored)", self.unexpected),
                             ("shape mismatch (ignored)",
                              [f"{k} {tuple(a)} in checkpoint vs {tuple(b)} in model"
                               for k, a, b in self.mismatched])):
            if names:
                lines.append(f"  {title}: {len(names)}")
                lines += [f"    {n}" for n in names[:20]]
                if len(names) > 20:
                    lines.append(f"    ... and {len(names) - 20} more")
        return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike, who: str = "load_pretrained") -> Any:
    """Read a ``.pth`` file: cribo's checkpoint reader.

    The file is loaded with ``torch.load(weights_only=True)`` onto the CPU: only
    tensors, numbers, strings, plain containers and ``argparse.Namespace`` (which
    DINO / CrIBo training checkpoints pickle with their arguments) are accepted,
    so reading a file never runs code it holds.

    Args:
        path: the file: a run's ``checkpoint.pth`` or ``teacher_backbone.pth``, a
            published DINO / CrIBo checkpoint, any ``torch.save`` output.
        who: the function or command named at the start of every error message
            (e.g. ``"load_backbone"``).

    Returns:
        What was saved, unchanged, every tensor on the CPU: typically a state
        dict ``{name: Tensor}`` (e.g. ``"pos_embed"`` of shape (1, 1 + N, D)), or
        a dict of such entries (``"teacher"``, ``"student"``, ...) and plain
        values.

    Raises:
        FileNotFoundError: no file at ``path``, or a folder.
        ValueError: naming the file: empty, truncated (a zip checkpoint whose
            end is missing), text (a Git LFS pointer, an HTML page, ...), an
            unknown format, corrupt data, or Python objects beyond tensors and
            plain containers.  The message never suggests unsafe loading:
            cribo does not unpickle arbitrary objects.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"{who}: {path!r} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: no checkpoint file at {path!r}")
    # Training checkpoints of DINO/CrIBo also pickle their argparse.Namespace;
    # that class only holds attributes, so it is safe to allow.
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        # ``from None``: torch's own message advises weights_only=False, which
        # would run whatever code a corrupt or hostile file holds.
        raise ValueError(_unreadable_checkpoint(path, exc, who)) from None


def _unreadable_checkpoint(path: str, exc: BaseException, who: str) -> str:
    """Why ``torch.load`` failed on ``path`` (raising ``exc``), in one line that
    starts with ``who`` and never repeats torch's advice to load unsafely; the
    message of :func:`read_checkpoint`'s ValueError."""
    import re
    import zipfile

    size = os.path.getsize(path)
    where = f"{who}: cannot read the checkpoint {path!r} ({size:,} bytes)"
    with open(path, "rb") as fh:
        head = fh.read(512)
    msg = str(exc)
    if size == 0:
        return f"{where}: the file is empty (an interrupted save or copy?)"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        if not zipfile.is_zipfile(path):
            return (f"{where}: it is truncated -- a torch checkpoint (zip archive) whose end "
                    "is missing, as an interrupted save, copy or download leaves it")
    text = _as_text(head)
    if head[:1] != b"\x80" and head[:2] != b"PK" and text is not None:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        hint = ""
        if text.startswith("version https://git-lfs"):
            hint = "; it is a Git LFS pointer: fetch the real file (git lfs pull)"
        elif text.lstrip().lower().startswith(("<!doctype html", "<html")):
            hint = "; it is an HTML page: the download probably failed"
        return f"{where}: it is a text file, not a checkpoint (it starts {first!r}){hint}"
    found = re.search(r"GLOBAL ([\w.]+)", msg)
    if found:
        return (f"{where}: it holds Python objects other than tensors and plain containers "
                f"(first: {found.group(1)}), which cribo does not unpickle: it reads only "
                "tensors, numbers, strings and containers. Save the model's state dict "
                "where the checkpoint was made (torch.save(model.state_dict(), ...)) and "
                "give that file")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the|$)", msg,
                       re.S)
    why = (detail.group(1).strip().splitlines()[0] if detail else
           (msg.strip().splitlines()[0] if msg.strip() and "weights_only" not in msg
            else ""))
    why = f" ({type(exc).__name__}: {why})" if why else f" ({type(exc).__name__})"
    if head[:2] == b"PK":
        return f"{where}: the torch checkpoint (zip archive) is corrupt{why}"
    if head[:1] == b"\x80":
        return (f"{where}: it is corrupt, truncated, or a pickle file not written by "
                f"torch.save{why}")
    return (f"{where}: it is not a torch checkpoint (unknown format, first bytes "
            f"{head[:8].hex(' ')}){why}")


def _as_text(head: bytes) -> str | None:
    """``head`` decoded, if it looks like the start of a text file."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:   # not just a character cut at the end
            return None
        text = head[:e.start].decode("utf-8")
    return text if all(c.isprintable() or c in "\t\n\r" for c in text) else None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _infer_config(sd: Mapping[str, Tensor], num_heads: int | None, source: str) -> dict[str, Any]:
    """Rebuild the ViT's constructor arguments from the tensors' shapes."""
    need = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"load_pretrained: cannot infer the architecture from {source}: "
                         f"no {', '.join(absent)} among its keys (first keys: "
                         f"{', '.join(list(sd)[:5])}); pass model=")
    embed_dim, _, patch_size, _ = sd["patch_embed.proj.weight"].shape
    n = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"load_pretrained: pos_embed of {source} has {n} patch positions, "
                         "not a square grid; pass model=")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if num_heads is None:
        if embed_dim % HEAD_DIM:
            raise ValueError(f"load_pretrained: the checkpoint does not record the number of "
                             f"heads and embed_dim={embed_dim} is not a multiple of {HEAD_DIM}; "
                             "pass num_heads= or model=")
        num_heads = embed_dim // HEAD_DIM
    return dict(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim,
                depth=depth, num_heads=num_heads,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                qkv_bias="blocks.0.attn.qkv.bias" in sd)


def load_pretrained(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                    model: VisionTransformer | None = None, *, key: str | None = "teacher",
                    strict: bool = False, num_heads: int | None = None,
                    ) -> tuple[VisionTransformer, LoadReport]:
    """Load a published DINO / CrIBo ViT backbone (or one saved by cribo).

    Accepted layouts:

    * a training checkpoint: a dict with ``student`` / ``teacher`` entries whose
      keys carry ``module.`` (DDP) and/or ``backbone.`` (multi-crop wrapper)
      prefixes and include the head's ``head.*`` keys (skipped here); ``key``
      picks the entry (the teacher is what the paper evaluates);
    * a bare backbone state dict (``cls_token``, ``pos_embed``, ``blocks.0...``),
      with or without those prefixes.

    Args:
        path_or_state_dict: A file (read with :func:`read_checkpoint`) or an
            already loaded dict.
        model: The backbone to fill; if None, one is built with the architecture
            inferred from the tensors (width, depth and patch size from the
            shapes; heads as ``embed_dim / HEAD_DIM`` (64, from
            :mod:`cribo.nn.architectures`) unless ``num_heads`` is given;
            ``img_size`` from the positional embedding).
        key: The entry of a training checkpoint to load; ignored for a bare
            state dict.
        strict: If True, any missing, unexpected or mismatched key raises a
            ValueError naming them, and the model is left unchanged.
        num_heads: Number of attention heads when ``model`` is None (the
            checkpoint does not record it).

    Returns:
        ``(model, report)``; ``print(report)`` lists what was loaded, missing,
        unexpected and skipped.  Without ``strict``, an incomplete load also
        emits a warning.

    Raises:
        FileNotFoundError: No file at the path.
        ValueError: An unreadable or corrupt file, a checkpoint without the
            requested entry, an architecture that cannot be inferred, or (with
            ``strict``) keys that do not match.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, obj = "<state dict>", path_or_state_dict
    else:
        source = repr(os.fspath(path_or_state_dict))
        obj = read_checkpoint(path_or_state_dict)

    entry: str | None = None
    if (key is not None and isinstance(obj, Mapping) and key in obj
            and not isinstance(obj[key], Tensor)):
        entry, obj = key, obj[key]
    elif not _is_state_dict(obj):
        entries = (", ".join(repr(k) for k in obj) if isinstance(obj, Mapping)
                   else type(obj).__name__)
        raise ValueError(f"load_pretrained: {source} is neither a state dict nor a checkpoint "
                         f"with a {key!r} entry (it has: {entries}); pass key= one of its entries")
    if not _is_state_dict(obj):
        raise ValueError(f"load_pretrained: entry {entry!r} of {source} is not a state dict of "
                         "tensors")

    state: dict[str, Tensor] = {}
    skipped: list[str] = []
    for k, v in obj.items():
        name = _strip_prefixes(k)
        if name.startswith(_HEAD_PREFIX):
            skipped.append(k)
        else:
            state[name] = v

    if model is None:
        model = VisionTransformer(**_infer_config(state, num_heads, source))
    own = model.state_dict()
    report = LoadReport(source=source, entry=entry, config=model.config(), skipped=skipped)
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                         for k in own if k in state and state[k].shape != own[k].shape]
    bad = {k for k, _, _ in report.mismatched}
    report.loaded = [k for k in own if k in state and k not in bad]

    if strict and not report.ok:
        raise ValueError(f"load_pretrained(strict=True): the checkpoint does not match the "
                         f"model; nothing was loaded.\n{report}")
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    if not report.ok:
        warnings.warn(f"load_pretrained: incomplete load\n{report}", stacklevel=2)
    return model, report
