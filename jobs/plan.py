"""The run's Ray Data plan: the stages chained, each with the resources it asks for.

read_datasource(DocumentListing) → map_batches(PlanDocuments) → repartition(1 render batch a block)
    → map_batches(RenderPages) → map_batches(AnswerPages, actor pool) → the driver's RunWriter

A run whose questions are all answered from the pages' text (``source: text_layer``) loads no model: its
answers are made by ``answer_from_text``, fused into the render task.
"""

from __future__ import annotations

import warnings

from actors.checkpoint import CheckpointInfo
from jobs.cluster import RENDER_TASK_CPUS
from pipeline.config import JobConfig
from pipeline.images import ImageGeometry
from pipeline.listing import DocumentListing
from pipeline.planning import PlanDocuments
from pipeline.rendering import PAGE_ROW_ALLOWANCE, RenderPages
from pipeline.skipping import KnownVersions, SkipDecision

# Listed documents a planning task reads and plans per batch: a Ray task costs tens of milliseconds on a
# small node, planning a one-page document a few (bench/small_documents.py).
PLAN_BATCH_DOCUMENTS = 32


def block_threshold(config: JobConfig, geometry: ImageGeometry | None) -> int:
    """The size past which Ray closes a block (``DataContext.target_max_block_size``): the budget less the
    largest table a render task hands on (a page with images, or text pages up to ``PAGE_ROW_ALLOWANCE``),
    since a block is closed only once a table takes it past the threshold (without a model, ``geometry``
    None, no page carries an image)."""
    largest_page = (geometry.max_split_page_bytes if geometry else 0) + PAGE_ROW_ALLOWANCE
    return max(1, config.render.block_mb * 1024 * 1024 - largest_page)


def render_task_resources(config: JobConfig) -> dict[str, float]:
    """What a render task asks Ray for. A CPU bounds the concurrent renders per node, and keeps Ray from
    fusing these tasks into the actor, where they would hold up the GPU."""
    return {"num_cpus": RENDER_TASK_CPUS, "memory": config.render.task_memory_mb * 1024 * 1024}


def build_page_dataset(
    config: JobConfig,
    geometry: ImageGeometry | None,
    skip: SkipDecision | None = None,
    ledger=None,
    resumed: KnownVersions | None = None,
):
    """The CPU part of the plan: list (one task per listing shard, or per group of them); read and plan the
    documents in batches (one task per batch); render and split each render batch's units (one task per
    batch, its pages handed on in blocks within ``render.block_mb``). ``geometry`` is the model's, None when
    no question can ask it."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.target_max_block_size = block_threshold(config, geometry)
    # Ray Data reserves each operator at least one task's resources: on a small node the repartition's CPU
    # kept a model-free run at one render task at a time (bench/small_documents.py: 13.3 s -> 10.8 s on 2
    # CPUs without). A run with a model keeps the reservation: it is what holds the actor pool its CPUs.
    context.op_resource_reservation_enabled = config.model_answers
    render = render_task_resources(config)
    # Planning a document (open it, count its pages) takes milliseconds: holding a CPU, it took the one left
    # beside the model actor on a 2-CPU node and, ranked before rendering by Ray Data (the stage holding less
    # of the object store goes first), planned every listed document before the first page was rendered
    # (bench/incremental.py). Without one, a few at a time per CPU, it runs beside the render tasks.
    planners = ray.data.TaskPoolStrategy(size=max(1, int(ray.cluster_resources().get("CPU", 1))))
    # A limit on planning tasks, not a wish for as many blocks: Ray Data's warning that a run of fewer listing
    # blocks cannot use it all would only puzzle the user.
    warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(PlanDocuments")
    plan = {"num_cpus": 0, "memory": render["memory"], "compute": planners}
    listing = DocumentListing(
        config.input, config.storage, skip, config.budget.max_documents, ledger, resumed, config.input_follow_links
    )
    return (
        # The listing waits on directory and object-store pages, not on a CPU: holding one (Ray's default for a
        # read task) beside the model actor took the only CPU left on a 2-CPU node, so no document was opened
        # before the whole listing was done (bench/incremental.py: first row 47 s -> 31 s over 200,000 files).
        ray.data.read_datasource(listing, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=listing.tasks_at_once))
        # A planning task takes listing blocks until it has PLAN_BATCH_DOCUMENTS documents (or the listing
        # is done), and hands on their units a render task's worth a row (pipeline/planning.py).
        .map_batches(PlanDocuments(config, ledger), batch_format="pyarrow", batch_size=PLAN_BATCH_DOCUMENTS, **plan)
        # Each render batch its own render task: a long document's ranges in parallel, small documents together.
        .repartition(target_num_rows_per_block=1)
        .map_batches(RenderPages(config, geometry, ledger), batch_format="pyarrow", batch_size=None, **render)
    )


def build_dataset(
    config: JobConfig,
    checkpoint: CheckpointInfo | None,
    run_id: str,
    skip: SkipDecision,
    ledger,
    resumed: KnownVersions,
):
    """The Ray Data plan: the CPU stages, then the model actor pool, streamed. The actors get what the driver
    learnt of the checkpoint (its family and image geometry), not the checkpoint to inspect again. Without a
    question the model may answer there is no checkpoint (None) and no actor."""
    from ray.data import ActorPoolStrategy

    from actors.answering import AnswerPages, answer_from_text

    pool = config.actors
    pages = build_page_dataset(config, checkpoint.geometry if checkpoint else None, skip, ledger, resumed)
    if checkpoint is None:  # no model to load: the answers are made in the task that read the pages
        return pages.map_batches(
            answer_from_text,
            fn_kwargs={"config": config, "run_id": run_id},
            batch_format="pyarrow",
            batch_size=None,
            **render_task_resources(config),  # the render task's own: Ray Data fuses the two into one task
        )
    return pages.map_batches(
        AnswerPages,
        fn_constructor_kwargs={"config": config, "checkpoint": checkpoint, "run_id": run_id},
        # The floor is one actor, not min_actors: after a lost node Ray restarts the lost actors on the nodes
        # left, where they may hold every CPU; an idle actor above the floor is let go, so the read/render
        # tasks get a CPU back instead of waiting forever (bench/node_loss.py, the `starved` topology).
        compute=ActorPoolStrategy(min_size=1, initial_size=pool.min_actors, max_size=pool.max_actors),
        num_gpus=pool.num_gpus_per_actor,
        num_cpus=pool.num_cpus_per_actor,
        batch_size=pool.batch_size,
        batch_format="pyarrow",
    )
