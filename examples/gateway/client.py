"""Calls the server 'words' over HTTP through pylm gateway, with nothing but
the standard library: what any other stack (curl, Go, Java, a browser) does.

Run: python examples/gateway/client.py http://127.0.0.1:8080
"""

import base64
import json
import sys
import urllib.error
import urllib.request


def post(url, body, content_type="application/octet-stream"):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:  # a problem+json body says what went wrong
        return error.code, error.read()


if __name__ == "__main__":
    gateway = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
    # One call: the payload is the body, the result the answer's body.
    status, body = post(f"{gateway}/words/upper", b"hello from http")
    print("upper:", status, body.decode())
    # Many jobs in one request: NDJSON in, a line per job out as each ends.
    jobs = "\n".join(json.dumps({"text": text}) for text in ("one", "two words", "and three words"))
    status, body = post(f"{gateway}/words/count", jobs.encode(), "application/x-ndjson")
    lines = sorted((json.loads(line) for line in body.splitlines()), key=lambda j: j["index"])
    print("count:", status, [base64.b64decode(line["result"]).decode() for line in lines])
    # Errors are RFC 9457 problems, with the status that fits.
    status, body = post(f"{gateway}/words/nothing", b"x")
    print("nothing:", status, json.loads(body)["title"])
    # The live cluster, described for OpenAPI tools.
    with urllib.request.urlopen(f"{gateway}/openapi.json", timeout=10) as answer:
        paths = sorted(path for path in json.load(answer)["paths"] if path.startswith("/words/"))
    print("openapi:", ", ".join(paths))
