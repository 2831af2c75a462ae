"""SGLang's session control on the simulator: /open_session, /close_session and
`session_params` on /generate (sglang 0.5.23 `session_controller.py`)."""

from __future__ import annotations

import json
import time

import httpx2 as httpx

A = list(range(2000, 2040))
B = list(range(3000, 3012))


def generate(client: httpx.Client, ids: list[int], session: dict | None = None, **extra) -> httpx.Response:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}, **extra}
    if session is not None:
        body["session_params"] = session
    return client.post("/generate", json=body)


def test_a_session_continues_from_a_request_its_input_and_output_and_keeps_a_tree(sim):
    with sim.client() as client:
        session_id = client.post("/open_session", json={"capacity_of_str_len": 1000}).json()
        assert isinstance(session_id, str) and len(session_id) == 32
        again = client.post("/open_session", json={"capacity_of_str_len": 1000, "session_id": session_id})
        assert again.status_code == 400 and "still open" in again.json()["error"]["message"]

        first = generate(client, A, {"id": session_id, "rid": None}).json()
        rid, output = first["meta_info"]["id"], first["output_ids"]
        assert first["meta_info"]["prompt_tokens"] == len(A) and len(output) == 6

        # appended to the first request: its input, its output, then the new ids
        second = generate(client, B, {"id": session_id, "rid": rid}).json()
        meta = second["meta_info"]
        assert meta["prompt_tokens"] == len(A) + len(output) + len(B)
        assert meta["cached_tokens"] >= len(A)  # the first request's sequence is in the prefix cache
        # the same reply as the whole input sent without a session
        plain = generate(client, A + output + B).json()
        assert plain["output_ids"] == second["output_ids"]

        # the previous output dropped, or the history cut at an offset
        dropped = generate(client, B, {"id": session_id, "rid": rid, "drop_previous_output": True}).json()
        assert dropped["meta_info"]["prompt_tokens"] == len(A) + len(B)
        cut = generate(client, B, {"id": session_id, "rid": rid, "offset": 5}).json()
        assert cut["meta_info"]["prompt_tokens"] == 5 + len(B)

        # a rid the session does not know
        unknown = generate(client, B, {"id": session_id, "rid": "nope"})
        assert unknown.status_code == 400 and unknown.json()["error"]["message"] == "Invalid request session id"

        # replace: the first request's children are dropped, so the second's rid is gone
        second_rid = meta["id"]
        assert generate(client, B, {"id": session_id, "rid": second_rid}).status_code == 200
        replaced = generate(client, B, {"id": session_id, "rid": rid, "replace": True})
        assert replaced.status_code == 200
        gone = generate(client, B, {"id": session_id, "rid": second_rid})
        assert gone.status_code == 400 and gone.json()["error"]["message"] == "Invalid request session id"

        # a logprob_start_len is checked against the whole input
        whole = len(A) + len(output) + len(B)
        ok = generate(client, B, {"id": session_id, "rid": rid}, return_logprob=True, logprob_start_len=whole - 2)
        assert ok.status_code == 200 and len(ok.json()["meta_info"]["input_token_logprobs"]) == 2
        too_far = generate(client, B, {"id": session_id, "rid": rid}, return_logprob=True,
                           logprob_start_len=whole + 1)
        assert too_far.status_code == 400 and "logprob_start_len" in too_far.json()["error"]["message"]

        # closed: the session is gone
        assert client.post("/close_session", json={"session_id": session_id}).status_code == 200
        closed = generate(client, B, {"id": session_id, "rid": rid})
        assert closed.status_code == 400
        assert closed.json()["error"]["message"] == f"Invalid request: session id {session_id} does not exist"


def test_a_session_times_out_and_a_named_session_opens_once(sim):
    with sim.client() as client:
        assert client.post("/open_session", json={"capacity_of_str_len": 10, "session_id": "mine",
                                                  "timeout": 0.2}).json() == "mine"
        assert generate(client, A, {"id": "mine"}).status_code == 200
        time.sleep(0.3)
        expired = generate(client, A, {"id": "mine"})
        assert expired.status_code == 400 and "does not exist" in expired.json()["error"]["message"]
        # the id is free again
        assert client.post("/open_session", json={"capacity_of_str_len": 10, "session_id": "mine"}).json() == "mine"
        assert client.post("/close_session", json={"session_id": "mine"}).status_code == 200


def test_streaming_sessions_append_one_request_at_a_time(sim_factory):
    with sim_factory().client() as client:
        refused = client.post("/open_session", json={"capacity_of_str_len": 10, "streaming": True})
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == ("Streaming sessions are disabled. "
                                                      "Please relaunch with --enable-streaming-session.")
    server = sim_factory("--enable-streaming-session", "--itl-ms", "20")
    with server.client() as client:
        session_id = client.post("/open_session", json={"capacity_of_str_len": 10, "streaming": True}).json()
        first = generate(client, A, {"id": session_id}).json()
        second = generate(client, B, {"id": session_id}).json()
        # each turn follows the last one that finished, whatever rid it names
        assert second["meta_info"]["prompt_tokens"] == len(A) + len(first["output_ids"]) + len(B)
        for params, message in (({"replace": True}, "Streaming sessions do not support replace."),
                                ({"offset": 3}, "Streaming sessions do not support offset."),
                                ({"drop_previous_output": True},
                                 "Streaming sessions do not support drop_previous_output.")):
            answer = generate(client, B, {"id": session_id, **params})
            assert answer.status_code == 400 and answer.json()["error"]["message"] == message
        # one request at a time: a second while the first streams is refused
        body = {"input_ids": B, "sampling_params": {"max_new_tokens": 20, "ignore_eos": True}, "stream": True,
                "session_params": {"id": session_id}}
        with client.stream("POST", "/generate", json=body) as streaming:
            lines = streaming.iter_lines()
            first_event = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first_event[6:])["meta_info"]["finish_reason"] is None
            busy = generate(client, B, {"id": session_id})
            assert busy.status_code == 400
            assert busy.json()["error"]["message"] == "Streaming session already has an active request."
            for _ in lines:
                pass
        # the streamed turn finished: the next follows it (its input, 20 tokens of output)
        streamed_input = second["meta_info"]["prompt_tokens"] + len(second["output_ids"]) + len(B)
        third = generate(client, B, {"id": session_id}).json()
        assert third["meta_info"]["prompt_tokens"] == streamed_input + 20 + len(B)


def test_replacing_an_unfinished_request_aborts_it_and_continues_from_its_output_so_far(sim_factory):
    server = sim_factory("--itl-ms", "20")
    with server.client() as client:
        session_id = client.post("/open_session", json={"capacity_of_str_len": 10}).json()
        body = {"input_ids": A, "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}, "stream": True,
                "session_params": {"id": session_id}}
        with client.stream("POST", "/generate", json=body) as streaming:
            events = (json.loads(line[6:]) for line in streaming.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]")
            event = next(events)
            while len(event["output_ids"]) < 5:
                event = next(events)
            rid = event["meta_info"]["id"]
            # appending to it is refused while it runs; replacing it aborts it
            early = generate(client, B, {"id": session_id, "rid": rid})
            assert early.status_code == 400
            assert early.json()["error"]["message"] == "Session request is appending to a request that hasn't finished."
            replaced = generate(client, B, {"id": session_id, "rid": rid, "replace": True}).json()
            last = event
            for last in events:
                pass
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        so_far = replaced["meta_info"]["prompt_tokens"] - len(A) - len(B)
        assert 5 <= so_far < 50
