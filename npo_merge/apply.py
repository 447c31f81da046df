"""Apply deltas to a target checkpoint: target + sum of scaled deltas, written in the target's layout.

Everything is checked before the first byte is written (architecture, missing modules, shapes,
output path). Then tensors stream one at a time: each native tensor of the target is read, its
canonical parts get their deltas added in fp32, and the result is cast back (to the target's dtype
unless told otherwise) and written. Untouched tensors are copied as they are. A single file stays a
single file with LDM/SGM names; a diffusers folder stays a folder with untouched components copied.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from npo_merge import __version__
from npo_merge.delta.files import Delta
from npo_merge.delta.ops import all_finite
from npo_merge.errors import CompatibilityError, InputError, UsageError
from npo_merge.io.atomic import atomic_output, check_output_path
from npo_merge.io.checkpoint import Checkpoint
from npo_merge.io.hashing import BackgroundHashes
from npo_merge.io.dual_checkpoint import FOLDER_BRANCH_FILE, Branch, branch_specs, branch_tensors
from npo_merge.io.keymap.links import KeyLink
from npo_merge.io.buffers import Buffers
from npo_merge.io.safetensors_stream import SafetensorsReader, SafetensorsWriter, TensorInfo, TensorSpec, save_tensors
from npo_merge.io.sources import TensorSource
from npo_merge.prefetch import Prefetch
from npo_merge.progress import Progress, ProgressFactory, no_progress


@dataclass(frozen=True)
class Term:
    """One delta with its scale in the sum target + sum(scale * delta)."""

    delta: Delta
    scale: float = 1.0


@dataclass
class ApplyPlan:
    """What an apply will do, decided before writing: which canonical tensors get which terms."""

    target: Checkpoint
    terms: list[Term]
    touched: dict[str, list[int]]
    unmatched: dict[int, list[str]] = field(default_factory=dict)

    @property
    def touched_natives(self) -> set[tuple[int, str]]:
        return {(id(self.target.entry(k).source), self.target.entry(k).link.native) for k in self.touched}


def plan_apply(target: Checkpoint, terms: Sequence[Term], *, allow_partial: bool = False,
               allow_empty: bool = False) -> ApplyPlan:
    """Check that every delta fits the target; raise CompatibilityError naming the keys otherwise."""
    if not terms and not allow_empty:
        raise UsageError("no delta given: pass at least one --delta")
    touched: dict[str, list[int]] = {}
    unmatched: dict[int, list[str]] = {}
    for index, term in enumerate(terms):
        delta = term.delta
        if target.architecture not in delta.architectures:
            raise CompatibilityError(
                f"{delta.path}: delta is for {delta.architecture}, target {target.path} is {target.architecture}"
            )
        missing = sorted(k for k in delta.keys if k not in target)
        mismatched = [
            f"{k} (delta {tuple(delta.keys[k])}, target {target.shape(k)})"
            for k in delta.keys
            if k in target and tuple(delta.keys[k]) != tuple(target.shape(k))
        ]
        if mismatched:
            raise CompatibilityError(f"{delta.path}: shape mismatch for {len(mismatched)} tensor(s): {', '.join(mismatched[:3])}")
        if missing and not allow_partial:
            raise CompatibilityError(
                f"{delta.path}: {len(missing)} tensor(s) missing from target {target.path}, e.g. {', '.join(missing[:3])};"
                " pass --allow-partial to apply the rest"
            )
        if len(missing) == len(delta.keys):
            raise CompatibilityError(f"{delta.path}: none of its {len(missing)} tensors exist in target {target.path}")
        if missing:
            unmatched[index] = missing
        for key in delta.keys:
            if key in target:
                touched.setdefault(key, []).append(index)
    return ApplyPlan(target, list(terms), touched, unmatched)


# Large tensors are updated in row chunks of about this many elements (16 MiB in fp32), so the
# peak memory is the tensor itself plus a chunk, whatever the tensor's size.
_CHUNK_ELEMENTS = 4 * 1024 * 1024


def summed_delta(plan: ApplyPlan, key: str, rows: tuple[int, int] | None = None,
                 buffers: Buffers | None = None) -> tuple[torch.Tensor, float]:
    """(delta, scale) such that the update is scale * delta, for one canonical tensor (or rows of it).

    A single full delta comes back as stored (fp16 stays fp16) with its scale, so the caller's one
    in-place add computes in fp32 without a separate conversion pass; several terms are summed in
    fp32. NaN or Inf in any delta is an error. A single delta read in rows may live in `buffers`.
    """
    indices = plan.touched[key]
    if len(indices) == 1:
        term = plan.terms[indices[0]]
        delta = term.delta.dense(key, rows, stored_dtype=True, buffers=buffers)
        if not all_finite(delta):
            raise InputError(f"{term.delta.path}: delta for {key!r} contains NaN or Inf; refusing to apply it")
        return delta, term.scale
    total: torch.Tensor | None = None
    for index in indices:
        term = plan.terms[index]
        delta = term.delta.dense(key, rows)
        if not all_finite(delta):
            raise InputError(f"{term.delta.path}: delta for {key!r} contains NaN or Inf; refusing to apply it")
        total = delta.mul_(term.scale) if total is None else total.add_(delta, alpha=term.scale)
    assert total is not None
    return total, 1.0


def _lora_term(plan: ApplyPlan, key: str) -> Term | None:
    """The term of `key` when it is the only one and a LoRA, else None."""
    indices = plan.touched[key]
    term = plan.terms[indices[0]]
    return term if len(indices) == 1 and term.delta.kind != "full" else None


# A bound on the product's entries below fp32's largest value (3.4e38) proves them finite.
_FINITE_BOUND = 1e38


def _add_lora_rows(term: Term, key: str, rows: tuple[int, int], into: torch.Tensor) -> bool:
    """into (rows [start, stop) of the target in fp32, 2-D) += scale * up[rows] @ down, as one GEMM that
    accumulates into them: no product tensor and no add pass of its own.

    The NaN/Inf check runs on the factors: finite factors whose |entries| bound the product's below
    _FINITE_BOUND give a finite delta. Where the bound does not hold, returns False with `into`
    untouched, and the caller checks the product itself (summed_delta).
    """
    factors = term.delta.lowrank(key.rsplit(".", 1)[0])
    up, down = factors.row_factors(*rows)
    alpha = term.scale * factors.scale
    bound = 0.0
    if up.numel() and down.numel():
        bound = float(torch.linalg.vector_norm(up, math.inf)) * float(torch.linalg.vector_norm(down, math.inf))
    if not math.isfinite(bound):
        raise InputError(f"{term.delta.path}: delta for {key!r} contains NaN or Inf; refusing to apply it")
    if bound * factors.rank * abs(alpha) >= _FINITE_BOUND:
        return False
    into.addmm_(up, down, alpha=alpha)
    return True


def _add_in_chunks(plan: ApplyPlan, key: str, tensor: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """tensor + delta a row chunk at a time, computed in fp32 and rounded once into `out_dtype`.

    When delta, tensor and output share a dtype and the scale is 1, the add happens in place in the
    tensor just read: torch adds fp16/bf16 in fp32 and rounds once, bit-identical to the explicit
    fp32 path (checked in the tests) without its conversion passes. Other cases convert explicitly
    (a scaled fp16 add rounds the scale to fp16; a mixed-dtype in-place add is ~8x slower on CPUs).
    """
    if tensor.dim() == 0:
        delta, scale = summed_delta(plan, key)
        return (tensor.float() + scale * delta.float().reshape(())).to(out_dtype)
    same_dtype = out_dtype == tensor.dtype
    out = tensor if same_dtype else torch.empty(tensor.shape, dtype=out_dtype)
    rows = tensor.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, tensor[0].numel()))
    lora = _lora_term(plan, key)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if lora is not None:
            wide = tensor[start:stop].to(torch.float32, copy=True)
            if _add_lora_rows(lora, key, (start, stop), wide.view(stop - start, -1)):
                out[start:stop] = wide
                continue
        delta, scale = summed_delta(plan, key, (start, stop))
        if same_dtype and delta.dtype == tensor.dtype and scale == 1.0:
            tensor[start:stop].add_(delta)
        else:
            out[start:stop] = tensor[start:stop].float().add_(delta.float(), alpha=scale)
    return out


def _apply_native(plan: ApplyPlan, source: TensorSource, link: KeyLink | None, native: str,
                  dtype: torch.dtype | None) -> torch.Tensor:
    tensor = source.tensor(native)
    out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    if link is None or not any(key in plan.touched for key in link.canonical):
        return tensor.to(out_dtype)
    if link.transform == "same":
        return _add_in_chunks(plan, link.canonical[0], tensor, out_dtype)
    parts = [part.float() for part in link.to_canonical(tensor)]
    for key, part in zip(link.canonical, parts):
        if key in plan.touched:
            delta, scale = summed_delta(plan, key)
            part.add_(delta.reshape(part.shape), alpha=scale)
    return link.to_native(parts, tensor.shape).to(out_dtype)


# Deltas that are only read (full deltas) go in smaller chunks, which measured fastest here (the
# buffers stay in cache); chunks with a LoRA product keep _add_in_chunks' size, so the matmul
# shapes, hence the bytes, are the same as there.
_READ_CHUNK_ELEMENTS = 1024 * 1024


def _row_chunks(plan: ApplyPlan, key: str, info: TensorInfo) -> list[tuple[int, int]]:
    """Row chunks [start, stop) for streaming one touched tensor."""
    lowrank = any(plan.terms[index].delta.kind != "full" for index in plan.touched[key])
    rows = info.shape[0]
    step = max(1, (_CHUNK_ELEMENTS if lowrank else _READ_CHUNK_ELEMENTS) // max(1, info.numel // rows))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _read_rows_fp32(source: SafetensorsReader, info: TensorInfo, rows: tuple[int, int], buffers: Buffers) -> torch.Tensor:
    """Rows [start, stop) of a target tensor as a flat fp32 tensor in `buffers`."""
    numel = (rows[1] - rows[0]) * (info.numel // info.shape[0])
    return source.read_into(info.name, buffers.get("fp32", numel, torch.float32), rows).view(-1)


def _row_deltas(plan: ApplyPlan, source: SafetensorsReader,
                jobs: list[tuple[str, tuple[int, int], TensorInfo]]) -> Prefetch:
    """For each (canonical key, rows, target tensor) in turn, (rows, delta, scale) made ahead on two
    threads (a LoRA chunk's product is most of apply's arithmetic), each in a buffer set of its own
    slot. Where a LoRA is the key's only term, the thread reads the target rows too and returns
    their fp32 sum with the delta, scale None (`_add_lora_rows`)."""
    workers = 2
    sets = [Buffers() for _ in range(workers + 2)]

    def make(slot: int, job: tuple[str, tuple[int, int], TensorInfo]) -> tuple[tuple[int, int], torch.Tensor, float | None]:
        key, rows, info = job
        buffers = sets[slot]
        lora = _lora_term(plan, key)
        if lora is not None:
            wide = _read_rows_fp32(source, info, rows, buffers)
            if _add_lora_rows(lora, key, rows, wide.view(rows[1] - rows[0], -1)):
                return rows, wide.view(rows[1] - rows[0], *info.shape[1:]), None
        return (rows, *summed_delta(plan, key, rows, buffers))

    return Prefetch(make, jobs, workers)


def _stream_rows(source: SafetensorsReader, info: TensorInfo, out_dtype: torch.dtype, writer: SafetensorsWriter,
                 buffers: Buffers, deltas: Iterator[tuple[tuple[int, int], torch.Tensor, float | None]]) -> None:
    """_add_in_chunks for a tensor of a safetensors file, without a whole-tensor copy: each row chunk
    (the next of `deltas`, up to the last row) is read into a reused buffer, added to its delta with
    the same arithmetic as _add_in_chunks (so the same bytes), and written from a staging buffer. A
    chunk with scale None already is the sum (in fp32) and is only cast."""
    row, stop = info.numel // info.shape[0], 0
    step = max(1, _READ_CHUNK_ELEMENTS // max(1, row))  # a LoRA chunk is added in cache-sized parts
    while stop < info.shape[0]:
        (start, stop), chunk, scale = next(deltas)
        for first in range(start, stop, step):
            last = min(stop, first + step)
            delta = chunk[first - start:last - start].reshape(-1)
            out = writer.staging(delta.numel(), out_dtype)
            if scale is None:
                out.copy_(delta)
            elif out_dtype == info.dtype and delta.dtype == info.dtype and scale == 1.0:
                source.read_into(info.name, out, (first, last))
                out.add_(delta)
            else:
                wide = _read_rows_fp32(source, info, (first, last), buffers)
                if delta.dtype != torch.float32:
                    delta = buffers.get("delta32", out.numel(), torch.float32).copy_(delta)
                out.copy_(wide.add_(delta, alpha=scale))
            writer.write_part(info.name, out)


def _copy_run(writer: SafetensorsWriter, source: SafetensorsReader, run: list[TensorInfo], progress: Progress) -> list[TensorInfo]:
    """Copy untouched tensors lying back to back in `source` into the output as they are (the writer's
    threads read the bytes into its blocks); returns an empty run."""
    if run:
        writer.copy([info.name for info in run], source.fileno(), run[0].start)
        progress.update(len(run))
    return []


def _write_streamed(plan: ApplyPlan, source: SafetensorsReader, names: list[str], specs: list[TensorSpec],
                    links: dict[tuple[int, str], KeyLink], writer: SafetensorsWriter, dtype: torch.dtype | None,
                    progress: Progress) -> None:
    """Write the tensors `names` of a safetensors file: untouched runs copied as bytes, touched
    tensors streamed in row chunks (their deltas made ahead on two prefetch threads), the rest
    (reshaped links, scalars) whole."""
    actions = []  # (info, link, spec, how)
    for name, spec in zip(names, specs):
        link, info = links.get((id(source), name)), source.info(name)
        if link is None or not any(key in plan.touched for key in link.canonical):
            how = "copy" if spec.dtype == info.dtype else "whole"
        else:
            how = "rows" if link.transform == "same" and info.numel and info.shape else "whole"
        actions.append((info, link, spec, how))
    jobs = [(link.canonical[0], rows, info) for info, link, _, how in actions if link and how == "rows"
            for rows in _row_chunks(plan, link.canonical[0], info)]
    buffers = Buffers()
    with _row_deltas(plan, source, jobs) as deltas:
        run: list[TensorInfo] = []  # untouched tensors lying back to back in the file, copied in one go
        for info, link, spec, how in actions:
            if how == "copy":
                if run and run[-1].end != info.start:
                    run = _copy_run(writer, source, run, progress)
                run.append(info)
                continue
            run = _copy_run(writer, source, run, progress)
            if how == "rows":
                _stream_rows(source, info, spec.dtype, writer, buffers, deltas)
            else:
                writer.write(info.name, _apply_native(plan, source, link, info.name, dtype))
            progress.update()
        _copy_run(writer, source, run, progress)


def _native_links(checkpoint: Checkpoint) -> dict[tuple[int, str], KeyLink]:
    return {(id(e.source), e.link.native): e.link for e in checkpoint.entries.values()}


def _write_source(plan: ApplyPlan, source: TensorSource, names: list[str], path: Path, metadata: dict[str, str],
                  dtype: torch.dtype | None, progress: Progress, branch: Branch | None = None) -> SafetensorsWriter:
    """Stream one output file (plus the branch tensors, if any); returns the open writer so the
    caller can patch metadata and close."""
    links = _native_links(plan.target)
    specs = []
    for name in names:
        info = source.info(name)
        out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        specs.append(TensorSpec(name, out_dtype, info.shape))
    branch_dtype = _branch_dtype(specs) if branch else None
    if branch:
        specs += branch_specs(branch, branch_dtype)
        metadata = {**metadata, **branch.metadata}
    writer = SafetensorsWriter(path, specs, metadata)
    try:
        if isinstance(source, SafetensorsReader):
            _write_streamed(plan, source, names, specs, links, writer, dtype, progress)
        else:
            for name in names:
                writer.write(name, _apply_native(plan, source, links.get((id(source), name)), name, dtype))
                progress.update()
        for name, tensor in branch_tensors(branch, branch_dtype) if branch else ():
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer


def _branch_dtype(specs: list[TensorSpec]) -> torch.dtype:
    """Branch factors are stored in the model's floating dtype (fp16 for an fp16 model)."""
    floats = [spec.dtype for spec in specs if spec.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float16


_PLACEHOLDER = "0" * 64


def _provenance(plan: ApplyPlan, digests: dict[str, str]) -> dict[str, str]:
    inputs = {"target": {"path": str(plan.target.path), "sha256": digests.get(str(plan.target.path), _PLACEHOLDER)}}
    inputs["deltas"] = [  # type: ignore[assignment]
        {"path": str(t.delta.path), "sha256": digests.get(str(t.delta.path), _PLACEHOLDER), "scale": t.scale,
         "role": t.delta.role}
        for t in plan.terms
    ]
    return {"npo_merge.version": __version__, "npo_merge.applied": json.dumps(inputs, sort_keys=True)}


def apply_plan(plan: ApplyPlan, out: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
               progress: ProgressFactory = no_progress, link_untouched: bool = False,
               extra_metadata: dict[str, str] | None = None, branch: Branch | None = None) -> Path:
    """Write target + deltas to `out` in the target's layout; returns `out`.

    With a non-empty `branch`, the output is a dual-branch checkpoint: the branch difference goes
    into the same file under its reserved prefix (a diffusers folder gets it as a file of its own).
    """
    out = Path(out)
    target = plan.target
    check_output_path(out, [target.path, *(t.delta.path for t in plan.terms)])
    with single_threaded_torch(), BackgroundHashes([target.path, *(t.delta.path for t in plan.terms)]) as hashes:
        metadata_extra = {**_provenance(plan, {}), **(extra_metadata or {})}

        def finish(writer: SafetensorsWriter) -> None:
            try:
                digests = {str(p): hashes.result(p) for p in [target.path, *(t.delta.path for t in plan.terms)]}
                writer.patch_metadata("npo_merge.applied", _provenance(plan, digests)["npo_merge.applied"])
            except BaseException:
                writer.abort()
                raise
            writer.close()

        if target.layout == "diffusers":
            _apply_folder(plan, out, dtype, progress, link_untouched, metadata_extra, finish, branch)
        else:
            source = target.sources[0]
            names = sorted(source, key=lambda n: (source.info(n).start, n))
            if branch:  # a new uncond branch replaces the one the target may already carry
                old = set(target.branch_names)
                names = [n for n in names if n not in old]
            bar = progress(len(names), out.name)
            try:
                finish(_write_source(plan, source, names, out, {**source.metadata, **metadata_extra}, dtype, bar, branch))
            finally:
                bar.close()
    return out


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Torch ops on one intra-op thread inside the block. Element-wise streaming gains nothing from
    intra-op threads, and with the hashing thread beside it, OpenMP threads waiting on a busy core
    made apply several times slower (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _component_of(checkpoint: Checkpoint, source: TensorSource) -> str:
    for key, entry in checkpoint.entries.items():
        if entry.source is source:
            return key.split(".", 1)[0]
    raise AssertionError("source without entries")


def _weights_name(source: TensorSource) -> str:
    """The single-file name to write a component under (shards are written as one file)."""
    name = source.path.name
    if ".safetensors.index" in name:  # diffusion_pytorch_model.safetensors.index.fp16.json
        stem, _, rest = name.partition(".safetensors.index")
        variant = rest[: -len(".json")]
        return f"{stem}{variant}.safetensors"
    if not name.endswith(".safetensors"):
        return name.rsplit(".", 1)[0].replace("pytorch_model", "model") + ".safetensors"
    return name


def _apply_folder(plan: ApplyPlan, out: Path, dtype: torch.dtype | None, progress: ProgressFactory,
                  link_untouched: bool, metadata: dict[str, str], finish: Callable[[SafetensorsWriter], None],
                  branch: Branch | None) -> None:
    target = plan.target
    touched = plan.touched_natives
    rewritten: dict[str, TensorSource] = {}
    for source in target.sources:
        if any((id(source), name) in touched for name in source):
            rewritten[_component_of(target, source)] = source
    copy = os.link if link_untouched else shutil.copy2
    with atomic_output(out, directory=True) as folder:
        for item in sorted(target.path.rglob("*")):
            relative = item.relative_to(target.path)
            component = relative.parts[0]
            if item.is_dir():
                (folder / relative).mkdir(parents=True, exist_ok=True)
                continue
            if component in rewritten and _is_weights_file(item):
                continue  # rewritten below; other variants of it would be stale, so they go
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            copy(item, folder / relative)
        for component, source in rewritten.items():
            names = sorted(source)
            bar = progress(len(names), f"{out.name}/{component}")
            try:
                writer = _write_source(plan, source, names, folder / component / _weights_name(source),
                                       {**source.metadata, **metadata}, dtype, bar)
                finish(writer)
            finally:
                bar.close()
        if branch:
            unet_dtype = next((target.dtype(k) for k in target.keys() if k.startswith("unet.")), torch.float16)
            save_tensors(folder / FOLDER_BRANCH_FILE, dict(branch_tensors(branch, dtype or unet_dtype)),
                         {**metadata, **branch.metadata})


def _is_weights_file(item: Path) -> bool:
    name = item.name
    return name.endswith((".safetensors", ".bin")) or (".safetensors.index" in name and name.endswith(".json"))
