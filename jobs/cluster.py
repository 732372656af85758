"""The Ray cluster a command runs on: joining or starting it, and the checks before any work that the
cluster can meet the config (GPUs for the actors, a CPU left for the render tasks); shared by `docqa run`,
`nightly` and `serve`."""

from __future__ import annotations

import logging
import os

from jobs import console
from pipeline.config import ConfigError, JobConfig

log = logging.getLogger("docqa")
RENDER_TASK_CPUS = 1.0  # what one read/render task asks for (jobs/plan.py)


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray: ``address`` (``--address``), else RAY_ADDRESS, names a running cluster by its GCS
    address (HEAD:6379, ``auto`` for the one `ray start` began on this machine, or ``ray://HEAD:10001``);
    with neither, a new local instance is started, even if a cluster runs on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {address} is a dashboard (job server) URL: `docqa run` joins a cluster by its GCS address "
            "(--address HEAD:6379 or RAY_ADDRESS=HEAD:6379); to run on the cluster as a Ray Job, use "
            f"`docqa submit --address {address}`"
        )
    console.before_ray_init()
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    console.after_ray_init()


def check_gpus(config: JobConfig) -> None:
    """Fail before any work when the actors need GPUs that this machine's Ray instance lacks. A cluster
    joined through RAY_ADDRESS may start GPU workers on demand (autoscaling), so there it is a warning."""
    import ray

    wanted = config.actors.num_gpus_per_actor if config.model_answers else 0  # no model, no actor: no GPU
    available = ray.cluster_resources().get("GPU", 0)
    if wanted == 0 or available >= wanted:
        return
    message = f"actors.num_gpus_per_actor={wanted:g} but the Ray cluster has {available:g} GPUs"
    if os.environ.get("RAY_ADDRESS"):
        log.warning("%s; waiting for the autoscaler to start GPU workers", message)
        return
    quantized = f" and model.quantization=none ({config.model.quantization} needs a GPU)"
    raise ConfigError(
        f"{message} (this machine has none): submit the job to a GPU cluster (docqa submit, RAY_ADDRESS) or set "
        f"actors.num_gpus_per_actor=0{quantized if config.model.quantization != 'none' else ''}"
    )


def check_cpus(config: JobConfig, cluster_cpus: float) -> None:
    """Before any work: the actor pool at its largest must leave a CPU for a read/render task, or those
    tasks wait forever behind actors that wait for pages."""
    pool = config.actors
    actor_cpus = pool.max_actors * pool.num_cpus_per_actor if config.model_answers else 0  # no model: no actor
    if actor_cpus + RENDER_TASK_CPUS <= cluster_cpus:
        return
    fit = int((cluster_cpus - RENDER_TASK_CPUS) // pool.num_cpus_per_actor) if cluster_cpus > RENDER_TASK_CPUS else 0
    advice = (
        f"set actors.max_actors={fit} (or lower actors.num_cpus_per_actor)"
        if fit >= pool.min_actors
        else f"lower actors.num_cpus_per_actor (e.g. {max(cluster_cpus - RENDER_TASK_CPUS, 0.1) / pool.max_actors:.2g})"
        " or add CPUs"
    )
    raise ConfigError(
        f"actors.max_actors={pool.max_actors} x actors.num_cpus_per_actor={pool.num_cpus_per_actor:g} = "
        f"{actor_cpus:g} CPUs, but the Ray cluster has {cluster_cpus:g}: at least {RENDER_TASK_CPUS:g} must stay "
        f"free for the read/render tasks, or they would wait forever behind the model actors; {advice}"
    )


def check_render_helper(config: JobConfig) -> None:
    """Before any work, that this machine can run the render helper as configured: one helper is started the
    way a run starts them, and with ``render.isolation: strict`` it must be confined (bubblewrap's namespaces
    and its own seccomp filter loaded; ``best_effort`` logs what is missing); with ``ocr.engine: tesseract``,
    its OCR's language data must be there (the workers of other nodes check again when they start one, and
    fail the pages they cannot read with the reason)."""
    from pipeline.confinement import OcrUnavailable, tessdata_directory
    from pipeline.records import DocumentError
    from pipeline.sandbox import check_helper

    try:
        check_helper(config.render, config.limits)
        if config.ocr.engine == "tesseract":
            tessdata_directory(config.ocr.languages)
    except (DocumentError, OcrUnavailable) as error:  # IsolationUnavailable is a DocumentError
        raise ConfigError(str(error)) from None
