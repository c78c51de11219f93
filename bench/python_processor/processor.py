#!/usr/bin/env python3
"""The payment status processor a Python team would write instead of paysync.

Consume JSON status-check requests from Kafka, call CM.com "Get Transaction"
for a whole batch concurrently (asyncio + one aiohttp session, one OAuth2
client-credentials token reused until it expires), publish one Avro
PaymentStatusEvent per request (single-object encoding: C3 01, the CRC-64-AVRO
fingerprint of the schema, the datum), flush, then commit the batch's offsets.
At-least-once: offsets are committed only after the events are acknowledged.

    python processor.py --brokers 127.0.0.1:9092 --input requests --output events \
        --group py-processor --cm-url http://127.0.0.1:8080 \
        --client-id demo-client --client-secret demo-secret --batch 1000 \
        --schema schemas/payment_status_event.avsc [--exit-when-idle 5]
"""
import argparse
import asyncio
import io
import json
import signal
import sys
import time
import uuid
from datetime import datetime
from urllib.parse import quote

import aiohttp
import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition
from fastavro.schema import fingerprint, to_parsing_canonical_form

# Same namespace as paysync, so both give a request the same event_id.
EVENT_ID_NAMESPACE = uuid.UUID("6b1f4a0e-93d2-4c6f-8e71-2f0ca5d39b14")
METHOD_SEGMENTS = {
    "GOOGLE_PAY": "google-pay", "APPLE_PAY": "apple-pay", "CREDIT": "creditcard",
    "CARD": "creditcard", "IDEAL": "ideal", "BANCONTACT_CARD": "bancontact",
    "CHECKOUT": "checkout",
}
# CM.com status -> UCS PaymentStatus (OPEN with a redirect is AUTHENTICATION_PENDING).
CM_STATUS = {
    "OPEN": "STARTED", "AUTHORIZED": "AUTHORIZED", "SUCCESS": "CHARGED",
    "CANCELLED": "VOIDED", "EXPIRED": "EXPIRED", "FAILURE": "FAILURE",
}
FINAL = {"CHARGED", "VOIDED", "EXPIRED", "FAILURE"}


class Token:
    """One OAuth2 client-credentials token, fetched when missing or about to expire."""

    def __init__(self, base_url, client_id, client_secret):
        self.url = base_url + "/api/v1/authorization/oauth2/token"
        self.form = {"client_id": client_id, "client_secret": client_secret,
                     "grant_type": "client_credentials"}
        self.value, self.expires = None, 0.0
        self.lock = asyncio.Lock()

    async def get(self, session, force=False):
        async with self.lock:
            if force or self.value is None or time.monotonic() > self.expires - 30:
                async with session.post(self.url, data=self.form) as r:
                    r.raise_for_status()
                    body = await r.json()
                self.value = body["access_token"]
                self.expires = time.monotonic() + body.get("expires_in", 300)
            return self.value


def failed(event, code, message, status_code=0):
    event["status"] = "PAYMENT_STATUS_UNSPECIFIED"
    event["status_code"] = status_code
    event["error"] = {"unified_details": {"code": code, "message": message,
                                          "description": None, "user_guidance_message": None},
                      "issuer_details": None, "connector_details": None}
    return event


async def check(session, token, base_url, msg):
    """One request -> one event dict (a failed check gives PAYMENT_STATUS_UNSPECIFIED)."""
    source = f"{msg.topic()}:{msg.partition()}:{msg.offset()}"
    req = json.loads(msg.value())
    tx_id = req["connector_transaction_id"]
    method = req.get("payment_method_type") or "GOOGLE_PAY"
    event = {
        "event_id": str(uuid.uuid5(EVENT_ID_NAMESPACE, source)),
        "request_id": req.get("request_id") or source,
        "connector": "cm",
        "merchant_id": req.get("merchant_id") or "default",
        "observed_at": int(time.time() * 1000),
        "attempts": 0,
        "connector_transaction_id": tx_id,
        "merchant_transaction_id": req.get("merchant_transaction_id"),
        "payment_method_type": method,
        "status_code": 0,
        "response_headers": {},
    }
    if method not in METHOD_SEGMENTS:
        return failed(event, "UNSUPPORTED_PAYMENT_METHOD", f"unsupported method {method}")
    url = (f"{base_url}/api/v1/paymentmethods/{METHOD_SEGMENTS[method]}"
           f"/v1/transactions/{quote(tx_id, safe='')}")
    try:
        for attempt in (1, 2):  # on a 401, refresh the token once and retry once
            bearer = await token.get(session, force=attempt == 2)
            async with session.get(url, headers={"Authorization": f"Bearer {bearer}",
                                                 "Accept": "application/json"}) as r:
                status, body = r.status, await r.read()
            event["attempts"] = attempt
            if status != 401:
                break
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # no answer, or no token
        code = "AUTHENTICATION_FAILED" if isinstance(e, aiohttp.ClientResponseError) else "CONNECTOR_TIMEOUT"
        return failed(event, code, f"{type(e).__name__}: {e}")
    event["observed_at"] = int(time.time() * 1000)
    if status == 404:
        return failed(event, "TRANSACTION_NOT_FOUND", "transaction not found", status)
    if status != 200:
        return failed(event, "CONNECTOR_ERROR_RESPONSE", f"HTTP {status}", status)
    try:
        tx = json.loads(body)
        raw_status = tx["status"]
    except (ValueError, KeyError, TypeError):
        return failed(event, "RESPONSE_DESERIALIZATION_FAILED", "bad transaction body", status)
    redirect = ((tx.get("action") or {}).get("redirect") or {}).get("url")
    ucs = CM_STATUS.get(raw_status, "UNRESOLVED")
    if raw_status == "OPEN" and redirect:
        ucs = "AUTHENTICATION_PENDING"
    amount = None
    if tx.get("amount") is not None and tx.get("currency"):
        amount = {"minor_amount": tx["amount"], "currency": tx["currency"]}
    refunds = tx.get("refunds") or {}
    created = tx.get("createdAt")
    event.update({
        "status": ucs,
        "status_code": status,
        "connector_status": raw_status,
        "amount": amount,
        "captured_amount": amount["minor_amount"] if amount and ucs == "CHARGED" else None,
        "merchant_order_id": tx.get("reference"),
        "created_at": int(datetime.fromisoformat(created).timestamp()) if created else None,
        "refunded_amount": refunds.get("refundedAmount"),
        "refund_pending_amount": refunds.get("refundedPendingAmount"),
        "redirection_data": ("io.paysync.v1.RedirectUri", {"uri": redirect}) if redirect else None,
        "is_final": ucs in FINAL,
    })
    if ucs == "FAILURE":
        event["error"] = {"unified_details": None, "issuer_details": None, "connector_details": {
            "code": "FAILURE", "message": "Transaction has not succeeded; unknown reason",
            "reason": None, "connector_transaction_id": tx_id}}
    return event


async def run(args):
    with open(args.schema, encoding="utf-8") as f:
        raw_schema = json.load(f)
    schema = fastavro.parse_schema(raw_schema)
    # fastavro gives the fingerprint as hex, already in the little-endian byte order.
    header = b"\xc3\x01" + bytes.fromhex(
        fingerprint(to_parsing_canonical_form(raw_schema), "CRC-64-AVRO"))

    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": args.group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": args.brokers, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 5})
    last_seen = time.monotonic()

    def on_assign(_consumer, _partitions):  # the idle clock starts once we own partitions
        nonlocal last_seen
        last_seen = time.monotonic()

    consumer.subscribe([args.input], on_assign=on_assign)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    token = Token(args.cm_url.rstrip("/"), args.client_id, args.client_secret)
    delivery_errors = []

    def on_delivery(err, _msg):
        if err is not None:
            delivery_errors.append(err)

    async def one(session, m):
        try:
            return await check(session, token, args.cm_url.rstrip("/"), m)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not a JSON request
            print(f"skipping {m.topic()}:{m.partition()}:{m.offset()}: {e!r}", file=sys.stderr)
            return None

    total, skipped, started, finished = 0, 0, None, None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while not stop:
            msgs = []
            for m in consumer.consume(num_messages=args.batch, timeout=1.0):
                if m.error():
                    print(f"consumer error: {m.error()}", file=sys.stderr)
                else:
                    msgs.append(m)
            if not msgs:
                if args.exit_when_idle and time.monotonic() - last_seen > args.exit_when_idle:
                    break
                continue
            started = started or time.monotonic()

            events = await asyncio.gather(*(one(session, m) for m in msgs))
            for event in events:
                if event is None:
                    skipped += 1
                    continue
                buf = io.BytesIO()
                buf.write(header)
                fastavro.schemaless_writer(buf, schema, event)
                producer.produce(args.output, key=event["connector_transaction_id"].encode(),
                                 value=buf.getvalue(), on_delivery=on_delivery)
                producer.poll(0)
            producer.flush()
            if delivery_errors:
                raise SystemExit(f"delivery failed, offsets not committed: {delivery_errors[0]}")
            offsets = {}
            for m in msgs:
                tp = (m.topic(), m.partition())
                offsets[tp] = max(offsets.get(tp, -1), m.offset() + 1)
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                            asynchronous=False)
            total += len(msgs)
            finished = last_seen = time.monotonic()
    consumer.close()
    elapsed = (finished - started) if started else 0.0
    rate = total / elapsed if elapsed > 0 else 0.0
    print(f"processed {total} requests ({skipped} skipped) in {elapsed:.2f} s: {rate:.0f}/s",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--brokers", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--cm-url", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--schema", required=True)
    p.add_argument("--exit-when-idle", type=float, default=None,
                   help="exit 0 after this many seconds without messages")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
