"""Webhooks: every chosen transition POSTed to the user's endpoints, signed, at-least-once.

Following the Standard Webhooks specification (https://www.standardwebhooks.com/): headers
``webhook-id`` (the same on every retry), ``webhook-timestamp`` and ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``). The pieces, in the order an event
travels them:

- ``endpoints.py``: which endpoints exist (``PAYPOLL_WEBHOOK_URL``, per-account ``webhook_url``)
  and which events each one gets;
- ``router.py``: reads the events stream through consumer group ``paypoll-webhooks`` and moves
  each chosen event, with its body fixed once, into its endpoint's queue (a Redis stream);
- ``queue.py``: an endpoint's queue, its state (healthy, failing, disabled) and dead letters;
- ``delivery.py``: one signed POST and what its answer means;
- ``driver.py``: one driver per endpoint in the whole fleet (a Redis lease) sends its queue in
  order: at the endpoint's concurrency while it answers, one probe at a time with backoff
  while it fails;
- ``service.py``: the router and the drivers as threads of worker process 0.
"""
