"""Drives the cachecast NATS service the way an event-driven pipeline would: with the
nats-py client and protobuf classes compiled from proto/ by protoc (grpcio-tools).

Usage: service_client.py NATS_URL ENV EXPECTED_AGENTS

Checks, and exits non-zero with the reason on the first that fails:
- $SRV.PING / $SRV.INFO discover the service and its endpoint subject;
- a protobuf InvalidateRequest gets an InvalidateReply with every agent applied;
- the event it published on cachecast.v1.<env>.inval decodes as an Invalidation;
- a JSON request gets the HTTP API's JSON body, and a bad one a 400 with its code;
- $SRV.STATS counts the requests.
"""

import asyncio
import importlib
import json
import pathlib
import sys
import tempfile

import nats
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def compile_proto():
    out = tempfile.mkdtemp(prefix="cachecast-proto-")
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    code = protoc.main([
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        str(ROOT / "proto/cachecast/v1/cachecast.proto"),
    ])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)
    return importlib.import_module("cachecast.v1.cachecast_pb2")


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


async def main(url, env, expected):
    pb = compile_proto()
    nc = await nats.connect(url)
    events = await nc.subscribe(f"cachecast.v1.{env}.inval")

    ping = json.loads((await nc.request("$SRV.PING.cachecast", b"", timeout=5)).data)
    check(ping.get("name") == "cachecast", f"$SRV.PING finds the service: {ping}")
    info = json.loads((await nc.request("$SRV.INFO.cachecast", b"", timeout=5)).data)
    subjects = [e.get("subject") for e in info.get("endpoints", [])]
    check("cachecast.svc.v1.*.invalidate" in subjects, f"$SRV.INFO lists the endpoint: {subjects}")

    subject = f"cachecast.svc.v1.{env}.invalidate"
    request = pb.InvalidateRequest(request_id="py-proto-1", timeout_ms=10000)
    request.identity.identity_template = "User"
    reply_msg = await nc.request(subject, request.SerializeToString(), timeout=15)
    reply = pb.InvalidateReply()
    reply.ParseFromString(reply_msg.data)
    check(reply.status == 200, f"protobuf reply status 200: {reply}")
    check(reply.request_id == "py-proto-1", "the reply carries the request id")
    check(reply.total == expected and reply.successful == expected,
          f"{expected} agents confirmed: total={reply.total} successful={reply.successful}")
    check(all(a.status == "applied" for a in reply.agents), "every agent applied")

    event_msg = await events.next_msg(timeout=5)
    event = pb.Invalidation()
    event.ParseFromString(event_msg.data)
    check(event.env == env and event.request_id == "py-proto-1",
          f"the published event decodes: env={event.env} request_id={event.request_id}")
    check(event.WhichOneof("target") == "identity"
          and event.identity.identity_template == "User",
          "the event carries the identity selector")
    check(event.ack_subject.startswith(f"cachecast.v1.{env}.ack."), "the event names its ack subject")

    body = {"response": {"scopeClientIds": ["s1", "s2"]}, "requestId": "py-json-1", "timeout": "10s"}
    answer = json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=15)).data)
    check(answer.get("status") == 200, f"JSON reply status 200: {answer}")
    check(answer["_nodes"]["successful"] == expected, "JSON reply has the _nodes summary")
    check(answer.get("requestId") == "py-json-1", "JSON reply carries the request id")

    bad = await nc.request(subject, json.dumps({"identity": {}}).encode(), timeout=15)
    refused = json.loads(bad.data)
    check(refused.get("status") == 400 and refused.get("code") == "missing_field",
          f"a bad JSON request is a 400 with its code: {refused}")
    check(bad.headers and bad.headers.get("Nats-Service-Error-Code") == "400",
          "a refusal carries the NATS service error header")

    stats = json.loads((await nc.request("$SRV.STATS.cachecast", b"", timeout=5)).data)
    counted = sum(e.get("num_requests", 0) for e in stats.get("endpoints", []))
    check(counted >= 3, f"$SRV.STATS counts the requests: {counted}")
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
