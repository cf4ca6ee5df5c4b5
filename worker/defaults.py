"""Every default of paypoll in one place, each with the reason for its value.

Settings, the client, the limiter, the actors and the sandbox take these as keyword defaults;
nothing else hard-codes a number that an operator might want to change.
"""

from __future__ import annotations

# --- connections -------------------------------------------------------------------------------
REDIS_URL = "redis://localhost:6379/0"  # the conventional local Redis
# Seconds a create waits for a replica to acknowledge its sent-mark (WAIT) under Sentinel: a
# local replica answers in about a millisecond; longer means it lags, and posting then could
# duplicate the payment after a failover.
REDIS_WAIT_TIMEOUT = 0.5
API_URL = "https://public-api.alternativepayments.io"  # production base URL (api-contract.md)
DEMO_API_URL = "https://public-api.demo.alternativepayments.io"  # provider's demo environment
PAYMENTS_PATH = "/payments/request"  # OpenAPI spelling; the FAQ writes /payment/request
KEY_PREFIX = "paypoll"  # every Redis key starts with this, so deployments can share a server
NAMESPACE = "paypoll"  # dramatiq's Redis namespace for queues

# --- HTTP --------------------------------------------------------------------------------------
CONNECT_TIMEOUT = 3.05  # seconds; slightly above a TCP retransmit window, as requests advises
READ_TIMEOUT = 10.0  # seconds; a create that has not answered by then is treated as ambiguous
TOKEN_RENEW_BEFORE = 60.0  # seconds before expires_in runs out that a token is renewed
TOKEN_LOCK_TTL = 15.0  # seconds a process may hold the token-renewal lock before others take over

# --- rate limit --------------------------------------------------------------------------------
RATE = 5.0  # requests per second per API key (api-contract.md)
RATE_MARGIN = 0.005  # seconds added to each slot interval to absorb jitter (measured, see docs)
MAX_WAIT = 1.0  # seconds a caller sleeps for a slot; a later slot reschedules the job instead
MAX_AHEAD = 10.0  # seconds ahead a slot is still booked (held for the rescheduled job); the cap
PENALTY_DEFAULT = 1.0  # seconds a key pauses after a 429 without Retry-After
PENALTY_MAX = 60.0  # a Retry-After larger than this is capped (a broken header must not stall us)

# --- tracking schedule -------------------------------------------------------------------------
POLL_FIRST_DELAY = 2.0  # seconds after create before the first poll: payers need time to pay
POLL_FACTOR = 1.6  # growth of the delay between polls
POLL_MAX_DELAY = 20.0  # cap between polls; 60 s made the p95 notice delay 44 s (docs/benchmarks.md)
POLL_JITTER = 1.0  # share of each delay drawn at random: 1 = full jitter, 0 = none
TRACKING_TIMEOUT = 86_400.0  # seconds after create after which tracking stops (tracking_timeout)

# --- poll planner (worker/polling/) ------------------------------------------------------------
POLL_POLICY = "planner"  # planner: spend the key's budget by hazard; backoff: the schedule above
# Share of a key's rate polls may use when no create waits: 0.9 leaves 0.5 req/s of a 5/s key
# for other software on the same key (or a token call) without a 429, and costs 10% of the
# polls; software that takes its slots through worker.api_slot() is subtracted exactly instead.
POLL_SHARE = 0.9
POLL_FLOOR = (
    0.2  # share of the rate polls keep while creates wait: a create backlog can't starve them
)
POLL_MIN_GAP = 1.0  # seconds: never poll one payment twice within this (a payer needs a moment)
# Seconds of detection delay a poll must save to be made: 0 spends the whole budget (polls are
# free until the key's share is used); above 0, a quiet key polls less (the square-root rule
# with a price per poll) and leaves its spare budget to other software.
POLL_COST = 0.0
POLL_MAX_GAP = 3600.0  # seconds: the longest a pending payment waits for a poll, whatever its odds
# Under saturation no payment's planned gap exceeds this many times the fair share
# (pending / poll budget): the hazard may favour some payments, never starve the others.
POLL_STARVATION_BOUND = 1.25
PLAN_REFRESH = 1.0  # seconds between two plans per key (threshold from pending ages and budget)

# --- create retries ----------------------------------------------------------------------------
CREATE_MAX_ATTEMPTS = 8  # safe-to-retry failures of a create before it is marked failed
RETRY_BASE_DELAY = 0.5  # seconds; first backoff after a safe failure
RETRY_MAX_DELAY = 30.0  # seconds; backoff cap for safe failures
RETRY_AMBIGUOUS_CREATE = (
    False  # re-post a create whose answer was lost (only if you know it is safe)
)

# --- durability --------------------------------------------------------------------------------
SWEEP_INTERVAL = 0.25  # seconds between sweeper passes: how late a due step may be dispatched
SWEEP_GRACE = 30.0  # seconds a dispatched step may take before it is dispatched again
# Seconds without a heartbeat after which a worker process counts as dead and the steps it
# was running are dispatched again. Processes beat every HEARTBEAT_EVERY (1 s), so this is
# five missed beats: a loaded host's late beat is not a death, and a killed worker's steps
# are back within about 5 s plus a sweep pass instead of the 30 s lease. A process paused
# longer than this (SIGSTOP, a GC pause) loses its steps; it cannot cause a second create:
# the create's sent-mark and the slot's lateness check at the write stop it.
DEAD_AFTER = 5.0
HEARTBEAT_EVERY = 1.0  # seconds between two heartbeats of a worker process
# Sweeper shards (PAYPOLL_SWEEPER_SHARDS): accounts are split by their Redis Cluster hash slot
# among this many leases, each led by one process. 4: a leader's death stalls a quarter of the
# keys for the lock's TTL instead of all of them, and a 4-process fleet shares the passes; an
# unled shard costs one lease GET per check (docs/benchmarks.md, "Sweeper shards"). 1 is the
# single fleet-wide sweeper of old (the same lock key, so old and new processes exclude each
# other during a rolling upgrade).
SWEEPER_SHARDS = 4
SWEEPER_SHARDS_MAX = 16384  # one shard per Redis Cluster hash slot at most
# A worker process runs the steps its sweeper shards claim on threads of its own, with no broker
# message per step (worker/local_steps.py), and sends only the overflow on the broker: about
# half the worker CPU of an API call went to the message's enqueue, fetch, middleware and ack.
LOCAL_STEPS = True
# Threads per process for those steps: a poll holds one only while it talks to Redis or the API
# (a few ms), never while it waits for its slot, so a few serve a process's share of many keys,
# and fewer threads contend less for the GIL right before a send (a late send draws a 429).
LOCAL_THREADS = 8
SWEEP_BATCH = 500  # due steps dispatched per pass and account
EVENTS_MAXLEN = 100_000  # approximate length cap of the events stream
# Milliseconds an idle dramatiq worker waits on its queue before fetching again (dramatiq's
# worker_timeout; its default is 1000). A message enqueued meanwhile waits up to this long:
# 250 put about 125 ms on an idle key's create (issue 12's wait floor is 150 ms + the API's
# answer); 50 costs one Redis round trip per idle consumer every 50 ms.
WORKER_IDLE_FETCH_MS = 50
# The same for the track queue when processes run their polls locally (PAYPOLL_LOCAL_STEPS):
# it carries only a busy process's overflow, which may wait a second for another process.
OVERFLOW_IDLE_FETCH_MS = 1000

# --- webhooks (worker/webhooks/) --------------------------------------------------------------
# Sent by default: the hosted url is known (created), the three final answers, and the states
# an operator must look at. Queued/creating are chatty and rarely acted on.
WEBHOOK_EVENTS = (
    "created",
    "paid",
    "expired",
    "cancelled",
    "rejected",
    "create_unknown",
    "tracking_timeout",
    "failed",
)
WEBHOOK_RETRY_FOR = 3 * 86_400.0  # seconds: a long weekend of an endpoint being down
WEBHOOK_CONCURRENCY = 8  # deliveries in flight per healthy endpoint: drains a backlog fast
WEBHOOK_CONNECT_TIMEOUT = 3.0  # seconds; a dead host fails fast and is probed again later
WEBHOOK_READ_TIMEOUT = 10.0  # seconds; receivers should answer 2xx first, then work
WEBHOOK_PROBE_FIRST = 1.0  # seconds before the first probe of a failing endpoint
WEBHOOK_PROBE_MAX = 30.0  # cap of the probe backoff (issue 12): a return is seen within 30 s
WEBHOOK_PROBE_JITTER = 0.1  # +-10% on each probe delay, so endpoints' probes spread out
WEBHOOK_LEASE = 10.0  # seconds a driver's lease on an endpoint lasts without renewal

# --- observability -----------------------------------------------------------------------------
METRICS_HOST = "127.0.0.1"  # loopback unless told otherwise: metrics are not public by default
METRICS_PORT = 9191  # the port dramatiq's own exporter uses, so existing scrape configs still work
LOG_FORMAT = "auto"  # json when stderr is not a TTY, console otherwise
LOG_LEVEL = "INFO"

# --- submit validation -------------------------------------------------------------------------
CURRENCIES = ("USD",)  # the only value the API documents
REFERENCE_ID_MAX = 128  # characters; the API documents none, so we keep ids short and safe
ACCOUNT_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # aliases appear in keys, labels and logs
