"""Where and how the PyTorch stages run: device, precision, CPU threads and the process group.

One module for training and inference alike, so both resolve `--device auto --precision auto` by the same rule:
cuda when visible, else cpu; bf16 where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX),
else fp32. Under torchrun (WORLD_SIZE > 1) the process group is gloo on CPU and nccl on GPU.

Also the stages' shared option plumbing: the runtime options' fields, and `stage_config`, which fills any stage's config
from its parsed command line.

Imports torch only: the GPU box that trains and scores has no Beam and no faiss.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from typing import TypeVar

import torch

from fashionbert.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclasses.dataclass
class Runtime:
    device: torch.device
    precision: str  # "bf16" or "fp32"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def training_attention(self) -> str | None:
        """The attention implementation a training step runs (FashionBertModel.attention); None = the model's own,
        sdpa. Why eager on a CPU in bf16: there torch's fused sdpa kernel (flash attention for CPU) is slow backwards,
        half of a joint recipe step, and transformers' eager attention (matmul, softmax, matmul) trains the step
        ~1.7x faster at the same FLOPs (`python bench/train.py --clean --batch-size 32` times both). In fp32, for
        inference (forward only) and on a GPU sdpa is as fast or faster, so they keep it."""
        return "eager" if self.device.type == "cpu" and self.precision == "bf16" else None

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------ collectives (no-ops alone)
    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return values
        import torch.distributed as dist

        v = values.to(self._collective_device).clone()
        dist.all_reduce(v)
        return (v / self.world).cpu()

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        if not self.distributed:
            return [values]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long, device=self._collective_device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.cpu().tolist() for o in out]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group (started by `setup_runtime`)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    @property
    def _collective_device(self) -> torch.device | str:
        # nccl reduces on the GPU; gloo on CPU tensors.
        return self.device if self.device.type == "cuda" else "cpu"


def cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # Without native bf16 instructions CPU autocast emulates bf16 and runs slower than fp32.
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _use_cuda(device: str) -> bool:
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolve_runtime(device: str = "auto", precision: str = "auto", num_threads: int = 0) -> Runtime:
    """A single-process runtime (scoring, evaluation, one-process training)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    dev = torch.device("cuda") if _use_cuda(device) else torch.device("cpu")
    return Runtime(device=dev, precision=resolve_precision(precision, dev))


def setup_runtime(device: str = "auto", precision: str = "auto", num_threads: int = 0) -> Runtime:
    """The runtime of this process of a torchrun launch (WORLD_SIZE/RANK/LOCAL_RANK from the environment; one
    process without them), with the process group joined. Call `Runtime.close()` when done."""
    if num_threads:
        torch.set_num_threads(num_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = _use_cuda(device)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(device=dev, precision=resolve_precision(precision, dev), rank=rank, world=world,
                   local_rank=local_rank)


C = TypeVar("C")


def stage_config(cls: type[C], args: argparse.Namespace) -> C:
    """The stage config `cls` filled from a parsed command line: every stage's config is a dataclass whose fields are
    its options' dests, with the command line's defaults (other attributes of `args` are ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """The fields of `add_runtime_arguments`' options, for the configs of the stages that take them."""

    device: str = "auto"
    precision: str = "auto"
    num_threads: int = 0


def add_runtime_arguments(parser: argparse.ArgumentParser, precision_help: str = "") -> argparse._ArgumentGroup:
    """--device, --precision and --num-threads, in a "runtime" group (returned, for a stage's own runtime options)."""
    d = RuntimeOptions()
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", choices=DEVICES, default=d.device,
                   help="auto = cuda if available, else cpu (default auto)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="bf16 or fp32 arithmetic; auto = bf16 where the device runs it natively (CUDA with bf16, CPUs "
                        "with AVX512-BF16/AMX), else fp32" + (f". {precision_help}" if precision_help else "")
                        + " (default auto)")
    g.add_argument("--num-threads", type=int, default=d.num_threads,
                   help="torch CPU threads per process, 0 = torch's default")
    return g
