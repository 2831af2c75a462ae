"""Calls to the local Stripe-compatible server's /_local/ controls (plain JSON over
HTTP, not Stripe's API), shared by the billing tests' fixtures."""
import json
import urllib.error
import urllib.request


def local_call(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
