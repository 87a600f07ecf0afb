"""Where featurize's workers run, from Beam's options: how many torch threads each gets, whether a progress bar in
the driver sees their work, and whether they can reach the driver's local paths.

Beam decides where user code runs: in the submitting process (FnApiRunner, DirectRunner, Prism, any runner with
`--environment_type LOOPBACK`), in processes on this machine (`--job_endpoint embed` with `--environment_type
PROCESS` or an EXTERNAL worker pool on localhost), or on other machines (Dataflow; Flink, Spark and other
portable runners with DOCKER, PROCESS or remote EXTERNAL workers). Workers on other machines do not see the
driver's disk: a local --out's staging folder, a local manifest or --previous folder are not there.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, PortableOptions, StandardOptions

from fashionbert.errors import UserError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclasses.dataclass(frozen=True)
class Execution:
    options: PipelineOptions
    runner: str
    torch_threads: int  # per worker thread: the cores divided among the workers sharing this machine
    in_process: bool  # the workers are threads of this process: a progress bar here sees their work
    same_machine: bool  # the workers run on this machine and read and write its local paths


def execution(beam_args: list[str]) -> Execution:
    """Local FnApiRunner unless the user names a runner."""
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
    options = PipelineOptions(args)
    runner = (options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1]
    direct = options.view_as(DirectOptions)
    workers = direct.direct_num_workers or 1
    if workers > 1 and not any(a.startswith("--direct_running_mode") for a in args):
        # Threads, not processes: torch and Pillow release the GIL, and the CNN loads once per thread
        # instead of once per process.
        direct.direct_running_mode = "multi_threading"
    local = runner.lower() in {r.lower() for r in StandardOptions.LOCAL_RUNNERS}
    portable = options.view_as(PortableOptions)
    loopback = (portable.environment_type or "").upper() == "LOOPBACK"
    in_process = (local and direct.direct_running_mode != "multi_processing") or loopback
    cores = os.cpu_count() or 1
    return Execution(options, runner, max(1, cores // workers) if local else cores, in_process,
                     local or loopback or _embedded_on_this_machine(portable))


def _embedded_on_this_machine(portable: PortableOptions) -> bool:
    """The job server runs in this process (`--job_endpoint embed`) and starts its workers here: as processes, or
    through a worker pool on localhost. A DOCKER worker is a container that does not see the host's folders."""
    if portable.job_endpoint != "embed":
        return False
    kind = (portable.environment_type or "").upper()
    if kind == "PROCESS":
        return True
    if kind == "EXTERNAL":
        address = portable.lookup_environment_option("external_service_address") or portable.environment_config or ""
        return address.rsplit(":", 1)[0] in LOCAL_HOSTS
    return False


SHARED_FILESYSTEM = "--shared-filesystem"


def take_shared_filesystem(beam_args: Sequence[str]) -> tuple[bool, list[str]]:
    """retrieve's and score-pairs' `--shared-filesystem` (featurize's is in its own config): whether it was given,
    and the Beam arguments without it."""
    rest = [a for a in beam_args if a != SHARED_FILESYSTEM]
    return len(rest) != len(beam_args), rest


def check_paths_reach_workers(run: Execution, paths: dict[str, str | None], shared_filesystem: bool) -> None:
    """Refuse local paths (no scheme) the workers must read or write when they run on other machines, unless the
    user says every worker mounts them at the same place."""
    if run.same_machine or shared_filesystem:
        return
    local = {opt: path for opt, path in paths.items() if path and "://" not in path}
    if not local:
        return
    named = ", ".join(f"{opt} {path}" for opt, path in local.items())
    raise UserError(
        f"{named}: a local path, but {_where(run)} the workers run on other machines, which do not see this "
        f"machine's disk (the output's staging folder would stay empty here); use a bucket the workers can reach, "
        f"e.g. --out gs://bucket/features (or s3://...), or pass --shared-filesystem if these paths are mounted at "
        f"the same place on every worker")


def _where(run: Execution) -> str:
    portable = run.options.view_as(PortableOptions)
    if portable.environment_type:
        return f"with --runner {run.runner} --environment_type {portable.environment_type}"
    return f"with --runner {run.runner}"

