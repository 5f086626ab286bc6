"""Every default a user can change, in one place.

The library's signatures, :class:`~crossgap_fast.InversionConfig`, the command line's options and
the output manifest all read their defaults from here. The paper's settings: OTI 150 steps, OVI
1000 steps, AdamW with lr 2e-2 and weight decay 0.01, the template "a photo of {}", one pseudo
token (R) or patch (P).
"""

from __future__ import annotations

from pathlib import Path

from crossgap_fast.demo.assets import DEMO_MODEL

# ------------------------------------------------------------------------------ the inversion
DEFAULT_STEPS = {"oti": 150, "ovi": 1000}
#: Steps of a warm-started inversion (from a start predicted by a fitted map). Measured on the
#: demo model: OTI reaches the exact 150-step loss by 10 steps and is below it at 15; OVI at 150
#: steps is within 0.001 of the exact 1000-step loss (scripts/measure_warm_start.py).
DEFAULT_WARM_STEPS = {"oti": 15, "ovi": 150}
#: The most steps an inversion may take: every item's per-step losses are kept (4 bytes a
#: step), so a mistyped count would fail in the allocator instead of being refused.
MAX_STEPS = 1_000_000
DEFAULT_TEMPLATE = "a photo of {}"
DEFAULT_LR = 2e-2
DEFAULT_WEIGHT_DECAY = 0.01
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
DEFAULT_NUM_TOKENS = 1
#: Arithmetic of the inversion's forward passes: "auto" is bf16 autocast on CUDA, fp32 on CPU.
DEFAULT_PRECISION = "auto"
#: Each sample's loss is divided by this (the paper's batch mean over 64 images).
DEFAULT_LOSS_BATCH = 64
#: Samples the reference backend optimises together (the paper's batch).
REFERENCE_BATCH = 64
#: Standard deviation of the Normal(0, std) random start.
INIT_STD = 0.02
#: Seed of the random starts (each sample's start is drawn from ``(seed, sample id)``).
DEFAULT_SEED = 0
#: Ridge penalty of a warm-start map on the weights (not the bias), in units of the normalised
#: features' Gram matrix.
DEFAULT_RIDGE = 1e-2

#: Items per tower call of the one-shot encoders (``encode_images`` / ``ovi_features`` run the
#: image tower, ``encode_texts`` / ``oti_features`` the text tower).
DEFAULT_IMAGE_BATCH = 256
DEFAULT_TEXT_BATCH = 1024

# ---------------------------------------------------------------------------------- the model
#: The demo CLIP trained here, whose weights ship with the package (``--pretrained`` may be left
#: out for it; any other ``--model`` needs ``--pretrained``). The default of ``selfcheck`` only:
#: ``invert``, ``encode`` and ``eval`` require ``--model`` (``--model crossgap-demo`` for this one).
DEFAULT_MODEL = DEMO_MODEL
DEFAULT_PRETRAINED: str | None = None
#: Seed under which ``--pretrained random`` builds its weights (``torch.manual_seed``), so that
#: every process of a run (a resume, each worker) builds the same ones.
RANDOM_MODEL_SEED = 0

# ------------------------------------------------------------------------------- CPU threads
#: OpenMP wait policy the command line sets before torch loads, unless ``OMP_WAIT_POLICY`` is
#: set: idle workers sleep instead of spinning, so a run stays fast when other processes share
#: the cores (see :mod:`crossgap_fast.threads`).
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"
#: torch's CPU threads in the command line, unless ``OMP_NUM_THREADS`` is set; None: one per
#: CPU the process may run on (``os.sched_getaffinity``).
DEFAULT_CPU_THREADS: int | None = None
#: Most image decoding processes when ``--workers`` is not given (fewer on fewer CPUs).
DEFAULT_MAX_DECODE_WORKERS = 4
#: Seconds the command line waits for the host of weights it must download (the Hugging Face
#: hub, or open_clip's URL) to answer before it says, in one line, that it cannot reach it.
DEFAULT_HUB_TIMEOUT_S = 5.0

# ------------------------------------------------------------------------------- the pipeline
#: Items per shard of the output store (a shard is the unit of work, resume and leasing).
DEFAULT_SHARD_SIZE = 4096
#: Images or texts encoded per batch before inverting.
DEFAULT_ENCODE_BATCH = 128
#: A run in which more than this fraction of the items failed ends with an error (exit code 4
#: on the command line, ``EXIT_ITEMS_FAILED``); finished shards are kept.
DEFAULT_MAX_FAILED_FRACTION = 0.5
#: Seconds a shard lease lives without renewal; a dead worker's shard waits this long at most.
DEFAULT_LEASE_SECONDS = 120.0
#: The longest lease a worker may ask for (a week): a longer one could not be renewed (the
#: renewal thread's wait overflows) and a lease claiming more is treated as damaged.
MAX_LEASE_SECONDS = 7 * 24 * 3600.0
#: Clocks of the hosts sharing a run may differ by this much before a lease is judged by the
#: shared folder's file times instead of the expiry its writer wrote (and the skew reported).
CLOCK_TOLERANCE_SECONDS = 2.0
#: A temporary file of another host (whose writer cannot be checked) is removed by a joining
#: worker only once it is this old (a day): no live writer keeps one open that long.
FOREIGN_TEMP_MAX_AGE = 24 * 3600.0
#: "local" (this process and its decoders) or "ray" (Ray Data actors).
DEFAULT_ENGINE = "local"
#: Ray actors (one Inverter each) of the Ray engine.
DEFAULT_RAY_ACTORS = 1
#: What the store keeps of each item (every column it has), and in which float dtype.
DEFAULT_STORE = ("features", "tokens", "targets", "losses")
DEFAULT_DTYPE = "float32"
#: Stored features are L2-normalised (as clip-retrieval stores them), so an inner-product index
#: (FAISS, autofaiss) ranks by cosine similarity as read; ``normalize=False`` keeps them raw.
DEFAULT_NORMALIZE = True
#: The input's own columns carried into ``metadata/*.parquet``: "all", "none", or names
#: (a parquet input's other columns, an embedding folder's metadata, webdataset ``.json`` fields).
DEFAULT_KEEP_COLUMNS = "all"
#: Rows per batch of :func:`crossgap_fast.iter_inversions`.
DEFAULT_READ_BATCH = 65536
#: What one input item may cost to read (see :class:`~crossgap_fast.pipeline.inputs.limits.InputLimits`):
#: seconds for a whole download (connect, headers and body under one deadline), bytes of one
#: image (a download, a tar member or a local file), and redirects followed by one download.
DEFAULT_DOWNLOAD_TIMEOUT_S = 30.0
DEFAULT_MAX_ITEM_BYTES = 64 << 20
DEFAULT_MAX_REDIRECTS = 5
#: Further tries of a download that failed for a passing reason (refused or reset connection,
#: HTTP 429 / 5xx), all within the one download deadline, after 0.5 s, 1 s, 2 s ... pauses.
DEFAULT_DOWNLOAD_RETRIES = 2
#: Failures listed by ``crossgap status`` (the most recent ones).
DEFAULT_FAILURES_SHOWN = 5

# ----------------------------------------------------------------------------- the evaluation
#: Where encoded features and inversions of benchmark datasets are kept when no cache is given.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "crossgap"
#: Where ``crossgap eval paper`` writes its table and per-dataset results (resumable).
DEFAULT_PAPER_OUT = "crossgap-paper"
