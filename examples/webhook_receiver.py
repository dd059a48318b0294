"""A ddserve webhook receiver: checks each delivery's Standard Webhooks signature, drops repeats.

DDSERVE_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py 8080
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from standardwebhooks import Webhook, WebhookVerificationError


class Receiver(BaseHTTPRequestHandler):
    secret = os.environ.get("DDSERVE_WEBHOOK_SECRET", "")  # the same secret as the deployment's
    # webhook-ids handled: delivery is at-least-once, a retry repeats one
    seen: ClassVar[set[str]] = set()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:  # HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>", timestamp within 5 min
            message = Webhook(self.secret).verify(body, dict(self.headers))
        except WebhookVerificationError:
            self.send_response(400)  # not from ddserve (or replayed too late): refuse it
            self.end_headers()
            return
        if self.headers["webhook-id"] not in self.seen:
            self.seen.add(self.headers["webhook-id"])
            job = message["data"]  # the job as GET /jobs/{id} shows it
            print(message["type"], job["id"], job["status"], job["progress"], flush=True)
            if message["type"] == "job.completed" and job["status"] == "succeeded":
                print([image["url"] for image in job["output"]["images"]], flush=True)
        self.send_response(204)  # any 2xx: delivered; anything else is retried with backoff
        self.end_headers()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    ThreadingHTTPServer(("0.0.0.0", port), Receiver).serve_forever()
