"""A local Stripe-compatible API server, for tests and the demo in place of api.stripe.com.

Run it with `python -m billing.stripe_local --port 12111` and point stripe-python at it:
`stripe.StripeClient(key, base_addresses={"api": url, "meter_events": url})`. It speaks
Stripe's wire format (form-encoded v1, JSON v2, Stripe's objects, ids, lists and errors,
Idempotency-Key, signed webhooks), so moving to real Stripe is configuration only.
Test-only controls live under `/_local/`. Standard library + aiohttp + orjson; no Django.

Layout: `app` (HTTP: routing, auth, idempotency), `call` (shared request helpers: lists,
search, expand, metadata), one module per resource family (`customers`, `catalog`,
`metering`, `subscriptions`, `invoicing`, `events`), `delivery` (webhooks), `state`
(memory + JSON file), `wire` (encoding), `errors`.
"""
