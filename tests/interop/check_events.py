#!/usr/bin/env python3
"""An independent reader of what paysync publishes, written the way a Python
consumer team would: confluent-kafka for Kafka and fastavro for Avro, nothing
from paysync's own code. It runs the real `paysync` binary (and its CM.com
simulator) against a real broker, writes requests with confluent-kafka (JSON,
Avro single-object and Confluent framing encoded by fastavro, raw bytes, odd
headers, a tombstone) and then checks, for every event:

  * the single-object header is C3 01 followed by the CRC-64-AVRO fingerprint
    that fastavro computes itself from schemas/payment_status_event.avsc;
  * the datum decodes with fastavro (schemaless_reader) and uses every byte;
  * status, error code, ids and headers match what was sent;

and, for every dead letter, that key, value and original headers are the input's,
byte for byte, with the paysync-* headers added.

Usage (CI runs it against Apache Kafka, tests/kafka/broker.sh):
    python tests/interop/check_events.py --brokers 127.0.0.1:9092 --paysync target/debug/paysync
"""
import argparse
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from fastavro.schema import fingerprint, to_parsing_canonical_form

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PARTITIONS = 3
# README "Events": event_id is the UUIDv5 of "<topic>:<partition>:<offset>" in this namespace.
EVENT_ID_NAMESPACE = uuid.UUID("6b1f4a0e-93d2-4c6f-8e71-2f0ca5d39b14")


def load_schema(name):
    with open(os.path.join(ROOT, "schemas", name), encoding="utf-8") as f:
        raw = json.load(f)
    parsed = fastavro.parse_schema(raw)
    wire = bytes.fromhex(fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO"))
    return parsed, wire


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 within {timeout}s")


def fail(message):
    raise SystemExit(f"FAIL: {message}")


def avro_request(schema, fields):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, fields)
    return out.getvalue()


def request_record(**fields):
    """A request datum with every optional field of the request schema null."""
    base = {"connector_transaction_id": None}
    base.update(fields)
    return base


def cases(request_schema, request_fp):
    """(key, value, headers, expectation). expectation: ("event", status, code) or ("dead", reason)."""
    run = uuid.uuid4().hex[:8]
    out = []

    def event(tx, status, code=None, extra=None, headers=None):
        value = {"connector_transaction_id": tx}
        value.update(extra or {})
        out.append((tx.encode(), json.dumps(value).encode(), headers or [], ("event", status, code)))

    event(f"success-{run}-1", "CHARGED", extra={"amount": {"minor_amount": 1200, "currency": "EUR"}})
    event(f"open-3ds-{run}-2", "AUTHENTICATION_PENDING")
    event(f"open-{run}-3", "STARTED", extra={"payment_method_type": "APPLE_PAY"})
    event(f"authorized-{run}-4", "AUTHORIZED", extra={"payment_method_type": "CARD"})
    event(f"cancelled-{run}-5", "VOIDED")
    event(f"expired-{run}-6", "EXPIRED")
    event(f"failure-{run}-7", "FAILURE")
    event(f"unknown-{run}-8", "UNRESOLVED")
    event(f"notfound-{run}-9", "PAYMENT_STATUS_UNSPECIFIED", "TRANSACTION_NOT_FOUND")
    event(f"success-{run}-10", "PAYMENT_STATUS_UNSPECIFIED", "INTEGRITY_CHECK_FAILED",
          extra={"amount": {"minor_amount": 1, "currency": "EUR"}})
    # Routing from headers, with a header value that is not UTF-8 on an unrelated name.
    event(f"success-{run}-11", "CHARGED",
          headers=[("x-request-id", b"py-req-11"), ("x-merchant-id", b"default"), ("trace", b"\xff\xfe")])
    # The second connector, chosen by header and by field.
    event(f"pending-{run}-14", "PENDING", headers=[("x-connector", b"mollie")])
    event(f"failure-{run}-15", "FAILURE", extra={"connector": "mollie"})

    # Avro requests, encoded by fastavro: single-object with fastavro's fingerprint,
    # and Confluent framing with an accepted schema id.
    datum = avro_request(request_schema, {"connector_transaction_id": f"success-{run}-12"})
    out.append((b"avro-so", b"\xc3\x01" + request_fp + datum, [], ("event", "CHARGED", None)))
    datum = avro_request(request_schema, {"connector_transaction_id": f"authorized-{run}-13"})
    out.append((b"avro-cf", b"\x00" + struct.pack(">I", 7) + datum, [], ("event", "AUTHORIZED", None)))

    # Dead letters: raw bytes, odd headers, a tombstone, a truncated Avro datum.
    out.append((b"raw", b"\x01\x02 not json \xff", [("h", b"\x00\xff"), ("h", b"dup")], ("dead", "invalid_json")))
    out.append((b"\xfe\xff key", b"{not json", [("empty", b"")], ("dead", "invalid_json")))
    out.append((b"tomb", None, [("why", b"tombstone")], ("dead", "empty_value")))
    out.append((b"ghost", json.dumps({"connector_transaction_id": "x", "merchant_id": "ghost"}).encode(),
                [], ("dead", "unknown_merchant")))
    out.append((b"bad-id", b'{"connector_transaction_id":"../etc"}', [], ("dead", "invalid_transaction_id")))
    truncated = b"\x00" + struct.pack(">I", 7) + b"\x08abcd"
    out.append((b"short-avro", truncated, [], ("dead", "invalid_avro")))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--paysync", required=True)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()

    event_schema, event_fp = load_schema("payment_status_event.avsc")
    request_schema, request_fp = load_schema("status_check_request.avsc")
    print(f"event fingerprint (fastavro, wire order): {event_fp.hex()}")

    tag = f"interop-{uuid.uuid4().hex[:8]}"
    topics = {"input": f"{tag}.requests", "output": f"{tag}.events", "dlq": f"{tag}.requests.dlq"}
    admin = AdminClient({"bootstrap.servers": args.brokers})
    futures = admin.create_topics([NewTopic(topics["input"], PARTITIONS, 1),
                                   NewTopic(topics["output"], PARTITIONS, 1),
                                   NewTopic(topics["dlq"], 1, 1)])
    for f in futures.values():
        f.result(30)

    work = tempfile.mkdtemp(prefix="paysync-interop-")
    sim_port, http_port = free_port(), free_port()
    sim = subprocess.Popen([args.paysync, "simulate-cm", "--listen", f"127.0.0.1:{sim_port}"],
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "sim.log"), "w"))
    config = os.path.join(work, "paysync.toml")
    with open(config, "w") as f:
        f.write(f"""
[kafka]
brokers = "{args.brokers}"
group_id = "{tag}"
input_topic = "{topics['input']}"
output_topic = "{topics['output']}"
dead_letter_topic = "{topics['dlq']}"
[kafka.consumer]
"session.timeout.ms" = "6000"
[http]
listen = "127.0.0.1:{http_port}"
[processing]
accepted_schema_ids = [7]
[connectors.cm]
base_url = "http://127.0.0.1:{sim_port}"
[connectors.cm.accounts.default]
client_id = "demo-client"
client_secret = "demo-secret"
[connectors.mollie]
base_url = "http://127.0.0.1:{sim_port}"
[connectors.mollie.accounts.default]
api_key = "test_paysyncSimulatorKey00000000000"
""")
    log = open(os.path.join(work, "paysync.log"), "w")
    paysync = subprocess.Popen([args.paysync, "run", "--config", config], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{http_port}/healthz", 30)
        wait_http(f"http://127.0.0.1:{http_port}/readyz", 60)
        check(args, topics, event_schema, event_fp, request_schema, request_fp)
        paysync.send_signal(signal.SIGTERM)
        code = paysync.wait(60)
        if code != 0:
            fail(f"paysync exited {code} after SIGTERM")
    except BaseException:
        log.flush()
        with open(os.path.join(work, "paysync.log")) as f:
            sys.stderr.write(f.read()[-5000:])
        raise
    finally:
        for p in (paysync, sim):
            if p.poll() is None:
                p.kill()
                p.wait()
    print("OK: every event carries fastavro's fingerprint and decodes; every dead letter is byte for byte")


def check(args, topics, event_schema, event_fp, request_schema, request_fp):
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True})
    sent = {}
    delivered = []

    def on_delivery(err, msg):
        if err is not None:
            fail(f"produce failed: {err}")
        delivered.append((msg.partition(), msg.offset()))

    all_cases = cases(request_schema, request_fp)
    for i, (key, value, headers, expect) in enumerate(all_cases):
        producer.produce(topics["input"], key=key, value=value, headers=headers or None,
                         partition=i % PARTITIONS, on_delivery=on_delivery)
        producer.flush(30)
        sent[delivered[-1]] = (key, value, headers, expect)

    expected = len(sent)
    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": f"reader-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topics["output"], p, 0) for p in range(PARTITIONS)]
                    + [TopicPartition(topics["dlq"], 0, 0)])
    records = []
    deadline = time.time() + args.timeout
    while len(records) < expected and time.time() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            fail(f"consume error: {msg.error()}")
        records.append(msg)
    # Anything extra (a duplicate) would show up shortly after.
    settle = time.time() + 2
    while time.time() < settle:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            records.append(msg)
    consumer.close()
    if len(records) != expected:
        fail(f"expected {expected} records, got {len(records)}")

    seen = set()
    events = dead = 0
    for msg in records:
        headers = msg.headers() or []
        hmap = {}
        for k, v in headers:
            hmap.setdefault(k, v)
        if msg.topic() == topics["output"]:
            events += 1
            value = msg.value()
            if value[:2] != b"\xc3\x01":
                fail(f"event without the single-object marker: {value[:2].hex()}")
            if value[2:10] != event_fp:
                fail(f"event fingerprint {value[2:10].hex()} is not fastavro's {event_fp.hex()}")
            body = io.BytesIO(value[10:])
            event = fastavro.schemaless_reader(body, event_schema, event_schema)
            if body.read():
                fail("the event datum has trailing bytes")
            request_id = event["request_id"]
            position = event_position(event, request_id, topics["input"], sent)
            key, value_sent, headers_sent, expect = sent[position]
            if expect[0] != "event":
                fail(f"{position}: expected a dead letter, got an event")
            _, status, code = expect
            if event["status"] != status:
                fail(f"{position}: status {event['status']}, expected {status}")
            got_code = ((event.get("error") or {}).get("unified_details") or {}).get("code")
            if code is not None and got_code != code:
                fail(f"{position}: error code {got_code}, expected {code}")
            if msg.key() != event["connector_transaction_id"].encode():
                fail(f"{position}: event key {msg.key()!r} is not the transaction id")
            for h in ("x-request-id", "x-connector", "x-merchant-id", "content-type"):
                if h not in hmap:
                    fail(f"{position}: event header {h} missing")
            if hmap["x-request-id"].decode() != request_id:
                fail(f"{position}: x-request-id header differs from the event")
            if not isinstance(event["observed_at"], (int,)) and not hasattr(event["observed_at"], "year"):
                fail(f"{position}: observed_at is not a timestamp")
            want_id = str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{topics['input']}:{position[0]}:{position[1]}"))
            if event["event_id"] != want_id:
                fail(f"{position}: event_id {event['event_id']} is not UUIDv5 of the source position ({want_id})")
            if event["status"] == "FAILURE" and got_code is not None:
                fail(f"{position}: a technical failure was published as FAILURE")
            seen.add(position)
        else:
            dead += 1
            position = (int(hmap["paysync-source-partition"]), int(hmap["paysync-source-offset"]))
            if hmap["paysync-source-topic"].decode() != topics["input"]:
                fail("dead letter points at the wrong topic")
            key, value_sent, headers_sent, expect = sent[position]
            if expect != ("dead", hmap["paysync-error-code"].decode()):
                fail(f"{position}: dead letter {hmap['paysync-error-code']!r}, expected {expect}")
            if msg.key() != key or msg.value() != value_sent:
                fail(f"{position}: dead letter key/value differ from the input")
            original = [(k, v) for k, v in headers if not k.startswith("paysync-")]
            want = [(k, v if v is not None else None) for k, v in headers_sent]
            if original != want:
                fail(f"{position}: original headers changed: {original} != {want}")
            for h in ("paysync-error-message", "paysync-failed-at"):
                if h not in hmap:
                    fail(f"{position}: dead-letter header {h} missing")
            seen.add(position)
    if len(seen) != expected:
        fail(f"{expected - len(seen)} inputs without exactly one output")
    print(f"checked {events} events and {dead} dead letters from {expected} inputs")


def event_position(event, request_id, input_topic, sent):
    """The input position an event answers: the default request_id is topic:partition:offset."""
    if request_id.startswith(input_topic + ":"):
        _, p, o = request_id.rsplit(":", 2)
        return int(p), int(o)
    for position, (_, _, headers, _) in sent.items():
        if ("x-request-id", request_id.encode()) in headers:
            return position
    fail(f"event with unknown request_id {request_id}")


if __name__ == "__main__":
    main()
