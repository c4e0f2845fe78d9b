"""Stand-ins shared by the connector's unit tests."""

from __future__ import annotations


class FakeClient:
    def __init__(self) -> None:
        self.jobs, self.cancelled, self.results, self.health = [], [], [], []
        self.asked = []  # (url, req_id) release questions

    def submit(self, job) -> None:
        self.jobs.append(job)

    def cancel(self, req_id: str) -> bool:
        self.cancelled.append(req_id)
        return True

    def ask_release(self, url: str, req_id: str) -> None:
        self.asked.append((url, req_id))

    def drain_results(self):
        out, self.results = self.results, []
        return out

    def drain_health(self):
        out, self.health = self.health, []
        return out
