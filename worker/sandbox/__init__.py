"""The sandbox: a local emulator of the Alternative Payments API (``paypoll sandbox``).

It follows ``shared/api-contract.md``; start it with ``paypoll sandbox --port 0 ...`` or
``python -m worker.sandbox ...``. Its first (and only) stdout line is
``sandbox listening on http://HOST:PORT``. Modules: ``cli`` (options), ``config``/``notation``
(typed settings and their text forms), ``server`` (HTTP), ``state`` (API behaviour),
``validation`` (create bodies), ``answers`` (error shapes), ``ratelimit``, ``lifecycle``,
``payments`` (a payment and its poll figures), ``faults``, ``stats``.

API behaviour, in the order a request is judged
------------------------------------------------
1. The API key: for ``POST /oauth/token`` the Basic-auth client_id (even with a wrong secret, or
   one the sandbox does not know); otherwise the client of the bearer token (even expired).
   Requests with no usable credentials are counted under ``"(anonymous)"`` and not limited.
2. Rate limit per key (every API route, token call included): 429 + ``Retry-After`` (integer
   seconds, ceiling, >= 1; or an HTTP date, or absent: ``--retry-after``). Only accepted
   (non-429) requests count in the limit's window; refused ones never do.
3. Auth: token call -> 401 without a Basic header, 403 on bad credentials, 400 on a wrong
   Content-Type or grant_type. Other calls -> 401 on a missing, unknown or expired token.
4. Faults (``faults`` module): 5xx without processing; dropped create (payment made, socket
   closed with RST, no answer); malformed 200 body (request processed). Latency on all answers.
5. Processing: create -> 400 (not JSON, not an object, missing/non-string fields, amount not a
   positive decimal string, currency not USD, redirect_url not absolute http(s)), 422 (amount >
   ``--max-amount``), 200 PaymentRequest ``{id, reference_id, status, url, redirect_url,
   amount, currency}``. No de-duplication: every create makes a new payment. Get -> 400 on a
   malformed id, 404 on an unknown id or another client's payment, 200 PaymentRequest.
   Errors carry both shapes: ``{"error": {"message", "code"}, "code", "message",
   "validation_errors": {field: reason}}``.

Admin routes (no auth, never rate limited, not counted)
-------------------------------------------------------
- ``GET /_admin/health`` -> ``{"ok": true}``
- ``GET /_admin/stats[?payments=0][&times=1]`` -> the stats document below.
- ``POST /_admin/faults`` with a JSON object of changes -> the new fault settings. Keys:
  ``latency_ms`` ("MIN:MAX" | [MIN, MAX] | {endpoint: ...}), ``error_rate``, ``malformed_rate``
  (share | {endpoint: share} | "get=0.2,create=0.1"), ``error_statuses`` ([5xx...]),
  ``error_retry_after`` (seconds | null), ``drop_create_rate`` (share). Endpoints: token,
  create, get.
- ``POST /_admin/reset`` (body ``{"keep_faults": true}`` optional) -> forgets tokens (clients
  get 401 and must take a new token), payments, limiter windows and stats, re-seeds, and
  restores the start fault settings unless ``keep_faults``.
- ``POST /_admin/payments/{id}`` with ``{"status": "paid"|"expired"|"cancelled"}`` -> makes a
  non-terminal payment terminal now (for tests); the PaymentRequest.
- ``POST /_admin/seed`` with ``{"client_id": ID, "count": N, "prefix": "ref-"}`` -> ``{"ids":
  [...]}``: makes N (1..100,000) payments of that client now, as N creates would (ids, drawn
  plans, ``creates_by_reference`` with references prefix + 0, 1, ...), without going through
  the API: no rate limit, no request counted. For benchmarks that need 50,000 payments in
  tracking while the key's limit stays real. 400 naming the field on a bad body.
- ``GET /pay/{id}``: the payer's hosted page (HTML; the ``url`` of a PaymentRequest).

Stats document (``GET /_admin/stats``)
--------------------------------------
::

    {
      "now": float,                       # server time.time() when computed
      "config": {clients: [id...], rate, limit_mode, retry_after, token_ttl, seed, pay_after,
                 pay_after_tail ([share, min, max]), outcomes, stay_pending, expire_after,
                 unknown_status, unknown_status_name, max_amount},            # no secrets
      "faults": {...},                    # current fault settings (POST /_admin/faults shape)
      "clients": {
        client_id: {                      # "(anonymous)" for requests without a usable key
          "requests": {route: {status: count}},
                                          # route: "POST /oauth/token", "POST /payments/request",
                                          # "POST /payment/request", "GET /payments/request/{id}",
                                          # "GET /payment/request/{id}"; status: "200", "429",
                                          # ..., or "dropped" (a create closed without answer)
          "total": int,                   # requests answered (or dropped)
          "rate_limited": int,            # 429 answers
          "max_accepted_in_1s": int,      # largest count of ACCEPTED (non-429) requests in any
                                          # window (t-1s, t], exact over arrival timestamps
          "max_requests_in_1s": int,      # the same, refused requests included
          "token_calls": int,             # POST /oauth/token requests, any status
          "faults": {"error"|"drop"|"malformed": count},   # faults injected
          "polls": int,                   # GETs of its own payments that were processed
          "first_poll_at", "last_poll_at": float | null,   # arrivals of the first/last of them
          "polls_per_second": {"start": int, "counts": [int]}
                                          # only with ?times=1: those polls per whole second
                                          # of the clock, counts[i] for second start + i
                                          # (the last 86,400 s up to the latest poll)
          "accepted_times": [float]       # only with ?times=1: arrival times of accepted ones
          "rate_limited_times": [float]   # only with ?times=1: arrival times of refused ones
        }
      },
      "creates_by_reference": {client_id: {reference_id: count}},
                                          # payments made (200, dropped or malformed) per
                                          # reference_id; creates without reference_id: none
      "duplicates": [{"client_id", "reference_id", "count"}],   # entries above with count > 1
      "payments_count": int,
      "payments": {                       # omitted with ?payments=0
        id: {"client_id", "reference_id", "status" (now), "outcome" (drawn),
             "polls" (GETs by its owner that were processed),
             "created_at", "terminal_at" (epoch s it became terminal, null if not yet),
             "planned_terminal_at", "unknown_status_at" (null if none),
             "first_seen_terminal_at" (first well-formed 200 GET showing a terminal status,
             or null), "first_poll_at", "last_poll_at" (arrival of its first/last poll, or
             null), "max_poll_gap" (largest time between two consecutive polls, 0 with fewer
             than two)}
      },
      "dropped_creates": [{"client_id", "reference_id", "payment_id"}]
    }

Timestamps are ``time.time()`` of the sandbox host (same clock as a local Redis ``TIME``), read
under the state lock when the request is judged.
"""
