"""A small NVCF client: invoke a function and follow 202s until the result is ready.

Usage: API=http://127.0.0.1:8080 KEY=nvapi-... python examples/client.py FUNCTION_ID '{"hello": "world"}'
Optional: VERSION=<versionId> to pin a version, POLL_SECONDS=<n> for NVCF-POLL-SECONDS.
"""

import json
import os
import sys
import time

import httpx


def invoke(
    api: str, key: str, function_id: str, body: object, version_id: str | None = None, poll: int = 5
) -> httpx.Response:
    """POST to pexec, then poll pexec/status while the answer is 202; return the final response."""
    headers = {"Authorization": f"Bearer {key}", "NVCF-POLL-SECONDS": str(poll)}
    path = f"/v2/nvcf/pexec/functions/{function_id}" + (f"/versions/{version_id}" if version_id else "")
    with httpx.Client(base_url=api, headers=headers, timeout=poll + 30) as client:
        response = client.post(path, json=body)
        while response.status_code == 202:
            request_id = response.headers["NVCF-REQID"]
            print(f"202 in progress, polling {request_id}", file=sys.stderr)
            time.sleep(0.1)
            response = client.get(f"/v2/nvcf/pexec/status/{request_id}")
        return response


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    body = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    response = invoke(
        os.environ.get("API", "http://127.0.0.1:8080"),
        os.environ["KEY"],
        sys.argv[1],
        body,
        os.environ.get("VERSION"),
        int(os.environ.get("POLL_SECONDS", "5")),
    )
    print(response.status_code, response.headers.get("NVCF-STATUS"), file=sys.stderr)
    print(response.text)


if __name__ == "__main__":
    main()
